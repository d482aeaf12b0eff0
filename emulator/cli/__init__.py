"""Thin command-line front ends over the host packages."""
