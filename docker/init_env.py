"""Write docker/.env from docker/.env.example with a random value for every empty password and secret.

    python3 docker/init_env.py                 # docker/.env (kept as it is where it has values)
    python3 docker/init_env.py --out FILE      # another file (docker/test-stack.sh writes a throwaway one)

Every `*_PASSWORD=` or `*_SECRET=` left empty gets 40 random hex digits (160 bits; hex because the values
end up inside database URLs and `user:password` logins). A value the output file already has is kept, so
running it again changes nothing, and settings that .env.example gained since are added with their
example value. The file is written with mode 600 and swapped in whole. Only the standard library is used:
any python3 runs it. The names of the generated settings are printed, never their values.
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECRET_KEY = re.compile(r"_(PASSWORD|SECRET)$")
LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def read_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        m = LINE.match(line.strip())
        if m:
            values[m.group(1)] = m.group(2).strip()
    return values


def render(example: str, existing: dict[str, str]) -> tuple[str, list[str]]:
    """The example's lines with the existing values put in and empty secrets generated."""
    out, generated, seen = [], [], set()
    for line in example.splitlines():
        m = LINE.match(line.strip())
        if not m:
            out.append(line)
            continue
        key, value = m.group(1), existing.get(m.group(1), m.group(2).strip())
        seen.add(key)
        if not value and SECRET_KEY.search(key):
            value = secrets.token_hex(20)
            generated.append(key)
        out.append(f"{key}={value}")
    extra = [k for k in existing if k not in seen]
    if extra:       # settings of the user's that the example does not have: kept, at the end
        out += ["", "# Not in .env.example:"] + [f"{k}={existing[k]}" for k in extra]
    return "\n".join(out) + "\n", generated


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", type=Path, default=HERE / ".env.example")
    ap.add_argument("--out", type=Path, default=HERE / ".env")
    args = ap.parse_args(argv)
    existing = read_values(args.out) if args.out.exists() else {}
    text, generated = render(args.example.read_text(), existing)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:       # mkstemp's file is mode 600 from the start
            f.write(text)
        os.replace(tmp, args.out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(args.out, 0o600)
    print(f"{args.out}: " + (f"generated {', '.join(generated)}" if generated else "no new secret needed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
