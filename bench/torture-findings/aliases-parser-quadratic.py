"""Torture fuzz finding: aliases.parse takes time quadratic in the refused targets (|program, /file).

Each refused target is checked against every problem found so far (`refused not in problems` in
_parse_entry): 4,000 program aliases take ~1.6 s of CPU, 8,000 ~6 s; a 64 KB fuzzed aliases file took
12 s. Run: .venv/bin/python bench/torture-findings/aliases-parser-quadratic.py"""

import time

from pymta import aliases

for count in (1000, 2000, 4000, 8000):
    text = "".join(f"p{i}: |/bin/prog{i}\n" for i in range(count))
    start = time.process_time()
    aliases.parse(text)
    print(f"{count} program aliases: {time.process_time() - start:.2f} s of CPU")
