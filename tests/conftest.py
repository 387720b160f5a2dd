"""Shared fixtures: the packed distribute.pyz and a cluster of real OpenSSH sshd processes."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# --- pyz (built once per test session) -------------------------------------
# (filled in by the zipapp work)

# --- sshd cluster ------------------------------------------------------------
# (filled in by the sshd fixture work)
