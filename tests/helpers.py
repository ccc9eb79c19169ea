"""Helpers shared by the test files: the repository root, and the ways tests start runs."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
