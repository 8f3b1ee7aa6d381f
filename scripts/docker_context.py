#!/usr/bin/env python3
"""Checks the Docker builds without a Docker engine (`make docker-context`).

For every Dockerfile in deploy/docker: hadolint passes (deploy/docker/.hadolint.yaml); every
path a COPY takes from the build context exists in the repository and is not excluded by the
Dockerfile's own .dockerignore; every `COPY --from` names an earlier stage; the binaries it
copies and runs are the workspace's; and the torch it installs is the version in
requirements.txt, so the image links the libtorch the tests ran against.
"""
import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"


def instructions(text):
    """(keyword, argument string) pairs, with line continuations joined and comments dropped."""
    joined, out = "", []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        if joined.strip():
            keyword, _, rest = joined.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
        joined = ""
    return out


def ignored(path, patterns):
    """Docker's .dockerignore semantics: the last matching pattern wins; `!` re-includes; a
    pattern that matches a folder covers what is inside it."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p.split("/")[-1], pat[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if hit:
            result = not negate
    return result


def check(dockerfile, errors):
    text = dockerfile.read_text()
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [l.strip() for l in ignore_file.read_text().splitlines()
                if l.strip() and not l.startswith("#")] if ignore_file.exists() else []
    stages = []
    bins = {"tessera-launcher", "tessera-router", "tessera-shard"}
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            m = re.search(r"\bAS\s+(\S+)", rest, re.I)
            stages.append(m.group(1) if m else None)
        elif keyword in ("COPY", "ADD"):
            args = shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            paths = [a for a in args if not a.startswith("--")]
            sources = paths[:-1]
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage is not None:
                if source_stage not in stages:
                    errors.append(f"{dockerfile.name}: COPY --from={source_stage} names no earlier stage")
                for s in sources:
                    name = Path(s).name
                    if name.startswith("tessera-") and name not in bins:
                        errors.append(f"{dockerfile.name}: copies unknown binary {name}")
                continue
            for s in sources:
                if not (ROOT / s).exists():
                    errors.append(f"{dockerfile.name}: COPY {s}: not in the repository")
                elif ignored(s, patterns):
                    errors.append(f"{dockerfile.name}: COPY {s}: excluded by {ignore_file.name}")
        elif keyword == "ENTRYPOINT":
            if not any(b in rest for b in bins):
                errors.append(f"{dockerfile.name}: ENTRYPOINT does not run a Tessera binary")
    pins = re.findall(r"torch==(\S+)", text)
    if not pins or any(p != torch_pin for p in pins):
        errors.append(f"{dockerfile.name}: installs torch {pins}, requirements.txt pins {torch_pin}")
    for name in ("HEALTHCHECK", "USER"):
        if not re.search(rf"^{name}\b", text, re.M):
            errors.append(f"{dockerfile.name}: no {name}")


def main():
    errors = []
    hadolint = Path(sys.executable).parent / "hadolint"
    dockerfiles = sorted(p for p in DOCKER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
    if not dockerfiles:
        sys.exit("no Dockerfiles in deploy/docker")
    for dockerfile in dockerfiles:
        check(dockerfile, errors)
        lint = subprocess.run([str(hadolint), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
                              capture_output=True, text=True)
        if lint.returncode != 0:
            errors.append(f"hadolint {dockerfile.name}:\n{lint.stdout}{lint.stderr}")
        print(f"{dockerfile.relative_to(ROOT)}: checked")
    if errors:
        sys.exit("\n".join(errors))
    print("Docker context OK")


if __name__ == "__main__":
    main()
