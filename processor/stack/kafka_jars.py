"""Finding Java and the Kafka broker's jars: from ``KAFKA_HOME``, or fetched once with Maven.

Maven copies the jars listed in ``kafka-pom.xml`` into ``<cache_dir>/kafka-<version>/libs``.
The copy goes to a staging folder that is renamed into place at the end, so a ``libs`` folder
that exists is complete, even when two test runs fetch at the same time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from processor.errors import StackError
from processor.stack.service import Say

KAFKA_POM = Path(__file__).with_name("kafka-pom.xml")
_POM_NAMESPACE = {"pom": "http://maven.apache.org/POM/4.0.0"}
_MAVEN_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class KafkaClasspath:
    """The JVM classpath of the broker and, for a Kafka distribution, its log4j2 config."""

    libs_dir: Path
    log4j_config: Path | None = None

    @property
    def classpath(self) -> str:
        # The JVM expands "dir/*" to every jar in dir itself; no shell is involved.
        return str(self.libs_dir / "*")


def find_java() -> str:
    """The java executable: ``$JAVA_HOME/bin/java``, else ``java`` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise StackError(
            "java not found: Kafka needs a Java 17+ runtime on PATH or in JAVA_HOME "
            "(Debian: apt-get install openjdk-17-jre-headless)"
        )
    return found


def kafka_version(pom: Path = KAFKA_POM) -> str:
    """The Kafka version pinned in the pom's ``kafka.version`` property."""
    version = (
        ET.parse(pom)
        .getroot()
        .findtext("pom:properties/pom:kafka.version", namespaces=_POM_NAMESPACE)
    )
    if not version:
        raise StackError(f"{pom} has no <kafka.version> property; restore the file from git")
    return version.strip()


def resolve_kafka_classpath(
    *, kafka_home: Path | None, cache_dir: Path, maven_log: Path, say: Say
) -> KafkaClasspath:
    if kafka_home is not None:
        return _distribution_classpath(kafka_home.expanduser())
    version = kafka_version()
    libs_dir = cache_dir.expanduser() / f"kafka-{version}" / "libs"
    if not libs_dir.is_dir():
        _fetch_with_maven(libs_dir, maven_log, say)
    return KafkaClasspath(libs_dir=libs_dir)


def _distribution_classpath(kafka_home: Path) -> KafkaClasspath:
    libs_dir = kafka_home / "libs"
    if not any(libs_dir.glob("kafka_*.jar")):
        raise StackError(
            f"KAFKA_HOME={kafka_home} has no libs/kafka_*.jar; point it at an unpacked Kafka "
            "distribution, or unset it to fetch the jars with Maven"
        )
    log4j_config = kafka_home / "config" / "log4j2.yaml"
    return KafkaClasspath(
        libs_dir=libs_dir, log4j_config=log4j_config if log4j_config.is_file() else None
    )


def _fetch_with_maven(libs_dir: Path, maven_log: Path, say: Say) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            f"Kafka jars are not cached in {libs_dir.parent} and mvn is not installed: install "
            "Maven (Debian: apt-get install maven), or set KAFKA_HOME to an unpacked Kafka "
            "distribution"
        )
    find_java()  # Maven needs Java as well; say so before Maven does, less clearly.
    say(f"fetching the Kafka jars with Maven into {libs_dir} (first time only)")
    libs_dir.parent.mkdir(parents=True, exist_ok=True)
    maven_log.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=libs_dir.parent))
    try:
        # Maven writes target/ next to the pom, so it works on a copy in a scratch folder and
        # never touches the installed package.
        with (
            tempfile.TemporaryDirectory(prefix="kafka-pom-") as scratch,
            maven_log.open("ab") as log,
        ):
            pom = Path(scratch) / "pom.xml"
            shutil.copyfile(KAFKA_POM, pom)
            command = [
                mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
            ]  # fmt: skip
            log.write(f"\n--- {' '.join(command)}\n".encode())
            log.flush()
            try:
                result = subprocess.run(
                    command, cwd=scratch, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, timeout=_MAVEN_TIMEOUT_S, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise StackError(
                    f"Maven did not finish fetching the Kafka jars in {_MAVEN_TIMEOUT_S:.0f} s; "
                    f"see {maven_log}; check access to Maven Central or set KAFKA_HOME"
                ) from exc
        if result.returncode != 0 or not any(staging.glob("kafka_*.jar")):
            raise StackError(
                f"Maven failed to fetch the Kafka jars (exit {result.returncode}); see "
                f"{maven_log}; check access to Maven Central (or the mirrors in "
                "~/.m2/settings.xml) or set KAFKA_HOME"
            )
        try:
            staging.rename(libs_dir)
        except OSError:
            if not libs_dir.is_dir():  # not a concurrent fetch that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
