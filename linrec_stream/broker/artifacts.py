"""Fetch a runnable Kafka broker as Maven artifacts, once, into a cache directory.

No Kafka tarball is reachable from where this project is built, but Maven Central is:
``kafka_2.13`` plus its runtime dependencies is a complete broker. The jars land in
``<kafka_cache_dir>/<version>/lib``; a ``COMPLETE`` marker is written last, so an
interrupted fetch is redone rather than half-used.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from linrec_stream.broker.errors import KafkaSetupError

# log4j2's SLF4J 2 binding; kafka_2.13 pulls slf4j-api 1.7, which cannot see it, so pin 2.x.
LOG4J_VERSION = "2.25.3"
SLF4J_VERSION = "2.0.17"
REQUIRED_CLASSES = ("kafka/Kafka.class", "kafka/tools/StorageTool.class")


def lib_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir.expanduser().resolve() / version / "lib"


def is_fetched(cache_dir: Path, version: str) -> bool:
    return (lib_dir(cache_dir, version).parent / "COMPLETE").exists()


def ensure_broker_jars(cache_dir: Path, version: str, log=print) -> Path:
    """Return the directory of the broker's jars, fetching them with Maven when absent.

    Raises :class:`KafkaSetupError` when Maven is missing or the fetch fails.
    """
    lib = lib_dir(cache_dir, version)
    if is_fetched(cache_dir, version):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaSetupError(
            "Maven (mvn) not found on PATH: it is needed once to fetch Kafka's jars from Maven Central "
            "(install maven, e.g. apt-get install maven)"
        )
    root = lib.parent
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    template = resources.files("linrec_stream.broker").joinpath("pom.xml").read_text()
    pom = (
        template.replace("@KAFKA_VERSION@", version)
        .replace("@LOG4J_VERSION@", LOG4J_VERSION)
        .replace("@SLF4J_VERSION@", SLF4J_VERSION)
    )
    (root / "pom.xml").write_text(pom)
    log(f"fetching Apache Kafka {version} from Maven Central into {lib} (once) ...")
    start = time.monotonic()
    proc = subprocess.run(
        [mvn, "-B", "-q", "-f", str(root / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={lib}", "-DincludeScope=runtime"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise KafkaSetupError(
            f"could not fetch org.apache.kafka:kafka_2.13:{version} from Maven Central (mvn exit {proc.returncode})",
            detail=tail,
        )
    _check_jars(lib, version)
    (root / "COMPLETE").write_text(f"{version}\n")
    log(f"fetched {len(list(lib.glob('*.jar')))} jars in {time.monotonic() - start:.1f}s")
    return lib


def _check_jars(lib: Path, version: str) -> None:
    import zipfile

    main = lib / f"kafka_2.13-{version}.jar"
    if not main.exists():
        raise KafkaSetupError(f"Maven fetched no {main.name} into {lib}")
    with zipfile.ZipFile(main) as zf:
        names = set(zf.namelist())
    missing = [c for c in REQUIRED_CLASSES if c not in names]
    if missing:
        raise KafkaSetupError(f"{main.name} lacks {', '.join(missing)}: not a runnable broker")
    if not list(lib.glob("log4j-slf4j2-impl-*.jar")) or not list(lib.glob("slf4j-api-2.*.jar")):
        raise KafkaSetupError(f"no SLF4J 2 logging binding in {lib}: the broker would log nothing")
