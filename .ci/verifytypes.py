"""pyright --verifytypes dbsession --ignoreexternal on the built wheel, as a user's checker sees it.

Usage: python .ci/verifytypes.py dist/sqlalchemy_dbsession-*.whl. Installs the wheel with
the extras whose modules it types (async, fastapi, flask, and pytest for the plugin) into a
temporary venv, runs pyright from an empty folder, prints the score and the symbols that are not
fully typed, and fails when the score is below REQUIRED_SCORE.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: The public API is completely typed (issue 19); any symbol that loses its types fails CI.
REQUIRED_SCORE = 100.0


def main(wheel: Path) -> int:
    """Run pyright on the installed wheel; return the exit status."""
    pyright = Path(sys.executable).with_name("pyright")
    with tempfile.TemporaryDirectory() as folder:
        venv = Path(folder) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        target = f"sqlalchemy-dbsession[async,fastapi,flask] @ {wheel.resolve().as_uri()}"
        subprocess.run([venv / "bin" / "pip", "install", "-q", target, "pytest"], check=True)
        path = f"{venv / 'bin'}:{os.environ['PATH']}"
        env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": path}
        done = subprocess.run(
            [pyright, "--outputjson", "--verifytypes", "dbsession", "--ignoreexternal"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    report = json.loads(done.stdout)["typeCompleteness"]
    score = 100 * report["completenessScore"]
    for symbol in report["symbols"]:
        if not symbol["isTypeKnown"] and symbol["isExported"]:
            print(f"  not fully typed: {symbol['name']}")
    print(f"verifytypes: type completeness {score:.1f}% (required {REQUIRED_SCORE}%)")
    return 0 if score >= REQUIRED_SCORE else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
