"""Torture fuzz finding: aliases parser raises ValueError: 'embedded null byte'.

Run: .venv/bin/python bench/torture-findings/aliases-parser-1.py"""
import sys
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
data = b'c: :include:INCLUDE\x00\n'
seed = 1722066718
import random, tempfile
from pathlib import Path
from torture import _fuzz_targets
target = [t for t in _fuzz_targets(Path(tempfile.mkdtemp())) if t.name == 'aliases parser'][0]
target.call(data, random.Random(seed))
