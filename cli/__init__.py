"""Thin click front ends: argument parsing, calling the library, printing."""
