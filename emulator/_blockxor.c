/*
 * The two per-16-byte-block loops of the XTS engine and the chunk digest,
 * compiled: mktme_emu._blockxor.
 *
 * Why C and not numpy: with 64-byte data units, XTS needs a different mask
 * for every 16-byte block (the unit's encrypted tweak times alpha^j).  numpy
 * builds that mask in about twenty whole-array passes (shifts, folds, an
 * interleave), which cost twice the AES itself; here it is one pass that
 * keeps the running tweak in two registers.  No library offers it:
 * OpenSSL's XTS takes one tweak per call (one call per 64-byte unit is far
 * slower than this), and `cryptography` exposes nothing finer.
 *
 * No key material ever reaches this file: the AES work (the tweak keys'
 * encryption of the unit addresses, the data pass) stays in OpenSSL through
 * `cryptography`; these loops only XOR buffers.  Both functions release the
 * GIL, so the engine's worker threads run them on every core.
 *
 * crypto.py keeps the numpy version of each loop: it is used when this module
 * is not built, and the tests check that both give the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "XTS tweaks are little-endian 128-bit integers; this file assumes a little-endian host"
#endif

enum { BLOCK = 16 };

/* (lo, hi) *= alpha in GF(2^128) (IEEE 1619: shift the little-endian 128-bit
 * value left one bit, folding x^128 back as 0x87). */
static inline void mul_alpha(uint64_t *lo, uint64_t *hi)
{
    uint64_t fold = (uint64_t)((int64_t)*hi >> 63) & 0x87;
    *hi = (*hi << 1) | (*lo >> 63);
    *lo = (*lo << 1) ^ fold;
}

static inline void xor_block(const uint8_t *s, uint8_t *d, uint64_t lo, uint64_t hi)
{
    uint64_t a, b;
    memcpy(&a, s, 8);
    memcpy(&b, s + 8, 8);
    a ^= lo;
    b ^= hi;
    memcpy(d, &a, 8);
    memcpy(d + 8, &b, 8);
}

/* (lo, hi) *= alpha^4: the four bits shifted out of the top fold back as
 * t * (x^7 + x^2 + x + 1), which fits the low word (t < 16). */
static inline void mul_alpha4(uint64_t *lo, uint64_t *hi)
{
    uint64_t top = *hi >> 60;
    *hi = (*hi << 4) | (*lo >> 60);
    *lo = (*lo << 4) ^ top ^ (top << 1) ^ (top << 2) ^ (top << 7);
}

/* Units of a multiple of four blocks (64 bytes and up): four tweak chains,
 * one per block position mod 4, each stepping by alpha^4.  The CPU overlaps
 * the four instead of waiting on one chain of multiplications (4096-byte
 * units: 6 -> 11-15 GB/s in cache; 64-byte units run the loop body once). */
static inline void xor_tweaks_by4(const uint8_t *first, const uint8_t *src, uint8_t *dst,
                                  Py_ssize_t units, Py_ssize_t blocks)
{
    for (Py_ssize_t i = 0; i < units; i++) {
        uint64_t lo[4], hi[4];
        memcpy(&lo[0], first + BLOCK * i, 8);
        memcpy(&hi[0], first + BLOCK * i + 8, 8);
        for (int k = 1; k < 4; k++) {
            lo[k] = lo[k - 1];
            hi[k] = hi[k - 1];
            mul_alpha(&lo[k], &hi[k]);
        }
        const uint8_t *s = src + (size_t)i * blocks * BLOCK;
        uint8_t *d = dst + (size_t)i * blocks * BLOCK;
        for (Py_ssize_t j = 0; j < blocks; j += 4) {
            for (int k = 0; k < 4; k++) {
                xor_block(s + BLOCK * (j + k), d + BLOCK * (j + k), lo[k], hi[k]);
                mul_alpha4(&lo[k], &hi[k]);
            }
        }
    }
}

/* dst = src XOR mask, where block j of unit i is masked with first[i] * alpha^j. */
static void xor_tweaks_loop(const uint8_t *first, const uint8_t *src, uint8_t *dst,
                            Py_ssize_t units, Py_ssize_t blocks)
{
    if (blocks == 4) {  /* 64-byte units: a constant count lets the compiler unroll the unit */
        xor_tweaks_by4(first, src, dst, units, 4);
        return;
    }
    if (blocks % 4 == 0) {
        xor_tweaks_by4(first, src, dst, units, blocks);
        return;
    }
    for (Py_ssize_t i = 0; i < units; i++) {  /* 16- and 32-byte units: one chain */
        uint64_t lo, hi;
        memcpy(&lo, first + BLOCK * i, 8);
        memcpy(&hi, first + BLOCK * i + 8, 8);
        const uint8_t *s = src + (size_t)i * blocks * BLOCK;
        uint8_t *d = dst + (size_t)i * blocks * BLOCK;
        for (Py_ssize_t j = 0; j < blocks; j++) {
            xor_block(s + BLOCK * j, d + BLOCK * j, lo, hi);
            mul_alpha(&lo, &hi);
        }
    }
}

/* out[k] = XOR of the 16-byte blocks of span k of data. */
static void fold_blocks_loop(const uint8_t *data, uint8_t *out, Py_ssize_t spans, Py_ssize_t span)
{
    for (Py_ssize_t k = 0; k < spans; k++) {
        const uint8_t *p = data + (size_t)k * span;
        uint64_t lo0 = 0, hi0 = 0, lo1 = 0, hi1 = 0;  /* two lanes: independent XOR chains */
        for (Py_ssize_t off = 0; off < span; off += 2 * BLOCK) {
            uint64_t w[4];
            memcpy(w, p + off, sizeof w);
            lo0 ^= w[0];
            hi0 ^= w[1];
            lo1 ^= w[2];
            hi1 ^= w[3];
        }
        lo0 ^= lo1;
        hi0 ^= hi1;
        memcpy(out + BLOCK * k, &lo0, 8);
        memcpy(out + BLOCK * k + 8, &hi0, 8);
    }
}

static PyObject *xor_tweaks(PyObject *self, PyObject *args)
{
    Py_buffer first, src, dst;
    Py_ssize_t unit;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*n", &first, &src, &dst, &unit))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t units = unit > 0 ? src.len / unit : 0;
    if (unit <= 0 || unit % BLOCK || src.len % unit)
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole %zd-byte units of 16-byte blocks",
                     src.len, unit);
    else if (dst.len != src.len)
        PyErr_Format(PyExc_ValueError, "source and destination differ in length (%zd != %zd)",
                     src.len, dst.len);
    else if (first.len < BLOCK * units)
        PyErr_Format(PyExc_ValueError, "%zd units need %zd bytes of tweaks, got %zd",
                     units, BLOCK * units, first.len);
    else {
        Py_BEGIN_ALLOW_THREADS
        xor_tweaks_loop(first.buf, src.buf, dst.buf, units, unit / BLOCK);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&first);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *fold_blocks(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    Py_ssize_t span;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*n", &data, &out, &span))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t spans = span > 0 ? data.len / span : 0;
    if (span <= 0 || span % (2 * BLOCK) || data.len % span)
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole spans of %zd bytes (a multiple of 32)",
                     data.len, span);
    else if (out.len < BLOCK * spans)
        PyErr_Format(PyExc_ValueError, "%zd spans need %zd bytes of output, got %zd",
                     spans, BLOCK * spans, out.len);
    else {
        Py_BEGIN_ALLOW_THREADS
        fold_blocks_loop(data.buf, out.buf, spans, span);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"xor_tweaks", xor_tweaks, METH_VARARGS,
     "xor_tweaks(first, src, dst, unit): dst = src XOR the XTS mask of each unit-byte data unit;\n"
     "unit i's 16-byte blocks use first[16i:16i+16] * alpha^j.  Releases the GIL."},
    {"fold_blocks", fold_blocks, METH_VARARGS,
     "fold_blocks(data, out, span): out[16k:16k+16] = XOR of the 16-byte blocks of span k.\n"
     "Releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockxor",
    "Compiled 16-byte-block XOR loops of the XTS engine and the chunk digest (no key material).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blockxor(void)
{
    return PyModule_Create(&module);
}
