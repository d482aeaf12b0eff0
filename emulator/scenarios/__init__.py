"""The user scenarios of SPEC section 6, and the fscrypt offload, driven from the host.

Each scenario boots as many VMs as it needs on the same emulated NVDIMM
(a later boot on the same media is a power cycle), runs the guest phases
with ``mktme-guest phase``, checks the media from the host, and reports a
table of rows, each an expected outcome beside the observed one.
"""

from .catalog import SCENARIOS, run_scenarios
from .report import Row, format_table

__all__ = ["SCENARIOS", "Row", "format_table", "run_scenarios"]
