"""deploy/ansible: lint, syntax, and a real run of site.yml against localhost.

The run (`ansible-playbook -c local`) deploys three inventory hosts — `zircon` (primary: NATS,
watcher, convert, process on two "GPUs", stitch, upload, monitoring), `aux1` (NATS, register)
and `aux2` (NATS) — each into its own temporary prefix (`deploy_prefix`: every path and unit
under it, no user, package or systemctl). The roots are shared by the hosts, as on the real
shared storage. Then: a second run changes nothing; the rendered units pass
`systemd-analyze verify` (stderr must be empty) and `systemd-analyze security --offline=true`
under EXPOSURE_LIMIT; `nats-server -t`, the project's config validator and `promtool check
config` accept the rendered configs; and the rendered ExecStart lines (specifiers, Environment,
EnvironmentFile and LoadCredential emulated) run as plain processes on loopback: a 3-node NATS
cluster with one user per service, every service, Prometheus; a simulated acquisition flows to
registration and upload. Not proven here: the systemd sandbox itself, SSH to several machines,
Grafana rendering (see docs/deployment.md).

The venv is made by the role (python -m venv, pip install of the project wheel built from this
checkout) without network: its dependencies come from this environment's site-packages through
`tilepipe_venv_extra_paths` (a .pth file), with `pip --no-index`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from services.core.config import load_config
from services.local.natsauth import service_permissions
from services.local.natsserver import find_nats_server, free_port_block, port_open
from services.local.simulate import small_manifest, write_manifest
from services.stages import stage_settings
from tests.conftest import stream_messages, wait_for

REPO = Path(__file__).resolve().parents[1]
ROLE_TEMPLATES = REPO / "deploy" / "ansible" / "roles" / "tilepipe" / "templates"
ANSIBLE = REPO / "deploy" / "ansible"
BIN = Path(sys.executable).parent
EXPOSURE_LIMIT = 4.0  # systemd-analyze security: "OK" ends at 4.9; ours score about 1.2-1.7
SERVICES = ("watcher", "convert", "process", "stitch", "register", "upload")
HOSTS = ("zircon", "aux1", "aux2")

pytestmark = pytest.mark.timeout(900)


def tool(name: str) -> str:
    """A required binary (CI installs it): missing fails, never skips."""
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.fail(f"`{name}` not found (see .ci/apt-packages and the dev extra)")
    return found


def ansible_env(tmp: Path) -> dict[str, str]:
    """Ansible and ansible-lint with every state directory under `tmp` (never ~/.ansible)."""
    for sub in ("home", "local", "remote", "cache"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_HOME": str(tmp / "home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "local"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "remote"),
        "ANSIBLE_CONFIG": str(tmp / "none.cfg"),  # no ansible.cfg from the working directory
        "ANSIBLE_PIPELINING": "1",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "XDG_CACHE_HOME": str(tmp / "cache"),
        "NO_COLOR": "1",
    }


def run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def free_block(size: int, avoid: set[int]) -> int:
    """A base port such that base..base+size-1 are free on loopback, below the ephemeral range
    (free_port_block), and not in `avoid` (ports handed out earlier in this deployment)."""
    for _ in range(100):
        base = free_port_block(size)
        ports = range(base, base + size)
        if avoid.isdisjoint(ports):
            avoid.update(ports)
            return base
    raise RuntimeError("no free port block")


# ---------------------------------------------------------------------------- static checks
def test_role_permission_table_equals_natsauth():
    """The nats role's user table is services.local.natsauth's, subject for subject."""
    defaults = yaml.safe_load((ANSIBLE / "roles/nats/defaults/main.yml").read_text())
    assert defaults["nats_service_permissions"] == service_permissions()


def test_ansible_lint_production_and_syntax_check(tmp_path):
    env = ansible_env(tmp_path)
    lint = run(
        [tool("ansible-lint"), "--offline", "--profile", "production", "--nocolor", "."],
        cwd=ANSIBLE,
        env=env,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    syntax = run(
        [
            tool("ansible-playbook"),
            "--syntax-check",
            "-i",
            "inventory/example/hosts.yml",
            "site.yml",
        ],
        cwd=ANSIBLE,
        env=env,
    )
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr


# ---------------------------------------------------------------------------- the deployment
@dataclass
class Deployment:
    tmp: Path
    ports: dict[str, dict[str, int]]
    roots: dict[str, Path]
    bucket: Path
    runs: list[subprocess.CompletedProcess] = field(default_factory=list)

    def prefix(self, host: str) -> Path:
        return self.tmp / "hosts" / host

    def units(self, host: str) -> Path:
        return self.prefix(host) / "etc/systemd/system"

    def config(self, host: str) -> Path:
        return self.prefix(host) / "etc/tilepipe/tilepipe.toml"

    def venv_bin(self, host: str) -> Path:
        return self.prefix(host) / "opt/tilepipe/venv/bin"


def build_wheel(tmp: Path) -> Path:
    """The project wheel from a copy of this checkout's sources, offline (setuptools of this
    environment); nothing is written into the checkout."""
    source = tmp / "source"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    readme = project["project"].get("readme", "README.md")
    for name in ("pyproject.toml", readme):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        for package in REPO.glob(pattern.removesuffix("*")):
            if package.is_dir():
                shutil.copytree(
                    package, source / package.name, ignore=shutil.ignore_patterns("__pycache__")
                )
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    dist = tmp / "dist"
    built = run([*cmd, "-q", "-w", str(dist), str(source)], timeout=300)
    if built.returncode != 0:
        pytest.fail(
            "building the project wheel offline failed (the dev extra must provide a setuptools "
            "that reads pyproject.toml, >= 77):\n" + built.stdout + built.stderr
        )
    return next(dist.glob("tilepipe-*.whl"))


def dependency_tree(tmp: Path) -> Path:
    """This environment's site-packages without tilepipe itself (symlinks): the venv's deps."""
    tree = tmp / "deps"
    tree.mkdir()
    site = Path(sysconfig.get_path("purelib"))
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("tilepipe", "__editable__")) or name.endswith(".pth"):
            continue
        (tree / entry.name).symlink_to(entry)
    return tree


def inventory(dep: Deployment, wheel: Path, deps: Path) -> dict:
    def nats(host: str) -> dict:
        p = dep.ports[host]
        return {
            "deploy_prefix": str(dep.prefix(host)),
            "nats_client_port": p["client"],
            "nats_cluster_port": p["cluster"],
            "nats_monitor_port": p["monitor"],
        }

    metrics = {
        host: {
            "tilepipe_metrics_base_port": dep.ports[host]["metrics"],
            "tilepipe_metrics_gpu_base_port": dep.ports[host]["metrics"] + 10,
        }
        for host in ("zircon", "aux1")
    }
    return {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_become": False,
                # modules need only the standard library: the base interpreter starts faster
                "ansible_python_interpreter": getattr(sys, "_base_executable", sys.executable),
                "tilepipe_wheel": str(wheel),
                "tilepipe_python": sys.executable,
                "tilepipe_venv_extra_paths": [str(deps)],
                "tilepipe_pip_extra_args": "--no-index",
                "tilepipe_install_gpu_extra": False,  # no CuPy offline: the GPU units run on CPU
                "tilepipe_roots": {k: str(v) for k, v in dep.roots.items()},
                "tilepipe_create_raw_root": True,
                "tilepipe_extra_rw_paths": [str(dep.bucket)],
                "tilepipe_watcher": {"settle_s": 0.2, "rescan_s": 5},
                "tilepipe_stages": {
                    "upload": {"options": {"url": dep.bucket.as_uri()}},
                    "process": {"ack_wait_s": 60},
                },
                "tilepipe_metrics_address": "127.0.0.1",
                "tilepipe_provision_host": "zircon",
                "nats_server_binary": str(find_nats_server()),
                "nats_address": "127.0.0.1",
                "nats_listen_address": "127.0.0.1",
                "monitoring_scrape_interval": "1s",
                "monitoring_scrape_timeout": "1s",
                "monitoring_promtool": tool("promtool"),
            },
            "children": {
                "nats": {"hosts": {host: nats(host) for host in HOSTS}},
                "tilepipe": {
                    "children": {
                        "primary": {
                            "hosts": {
                                "zircon": {
                                    "tilepipe_services": {
                                        "watcher": {},
                                        "convert": {"concurrency": 2},
                                        "process": {"concurrency": 1},
                                        "stitch": {},
                                        "upload": {"concurrency": 2},
                                    },
                                    "tilepipe_gpus": [0, 1],
                                    **metrics["zircon"],
                                }
                            }
                        },
                        "auxiliary": {
                            "hosts": {
                                "aux1": {"tilepipe_services": {"register": {}}, **metrics["aux1"]}
                            }
                        },
                    }
                },
                "monitoring": {
                    "hosts": {
                        "zircon": {
                            "monitoring_prometheus_listen": (
                                f"127.0.0.1:{dep.ports['zircon']['prometheus']}"
                            )
                        }
                    }
                },
            },
        }
    }


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    found = {}
    for line in output.split("PLAY RECAP", 1)[-1].splitlines():
        match = re.match(r"^(\S+)\s+:\s+(.*)$", line)
        if match:
            found[match[1]] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match[2])}
    return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    """site.yml run twice against localhost into per-host prefixes."""
    tmp = tmp_path_factory.mktemp("deploy")
    taken: set[int] = set()
    ports = {
        host: {
            "client": free_block(1, taken),
            "cluster": free_block(1, taken),
            "monitor": free_block(1, taken),
            "metrics": free_block(12, taken),
            "prometheus": free_block(1, taken),
        }
        for host in HOSTS
    }
    data = tmp / "data"
    dep = Deployment(
        tmp=tmp,
        ports=ports,
        roots={name: data / name for name in ("raw", "work", "output")},
        bucket=tmp / "bucket",
    )
    wheel = build_wheel(tmp)
    inv = tmp / "inventory" / "hosts.yml"
    inv.parent.mkdir()
    inv.write_text(yaml.safe_dump(inventory(dep, wheel, dependency_tree(tmp)), sort_keys=False))
    env = ansible_env(tmp / "ansible")
    for _ in range(2):
        played = run(
            [tool("ansible-playbook"), "-i", str(inv), str(ANSIBLE / "site.yml")],
            cwd=tmp,
            env=env,
        )
        assert played.returncode == 0, played.stdout[-6000:] + played.stderr[-3000:]
        dep.runs.append(played)
    return dep


def test_second_run_changes_nothing(deployment):
    first, second = (recap(r.stdout) for r in deployment.runs)
    assert set(first) == set(second) == set(HOSTS), deployment.runs[1].stdout[-3000:]
    assert all(first[h]["changed"] > 0 for h in HOSTS)
    assert all(second[h]["changed"] == 0 and second[h]["failed"] == 0 for h in HOSTS), second
    # the passwords were generated once, on the controller, outside the repository
    creds = deployment.tmp / "inventory/credentials/nats"
    assert {p.name for p in creds.iterdir() if not p.name.startswith(".")} >= {*SERVICES, "admin"}


def unit_files(dep: Deployment, host: str) -> list[Path]:
    return sorted(p for p in dep.units(host).iterdir() if p.suffix in (".service", ".target"))


def test_units_verify_without_warnings(deployment):
    expected = {
        "zircon": {
            "nats-server.service",
            "tilepipe.target",
            "tilepipe-process@.service",
            *(f"tilepipe-{s}.service" for s in ("watcher", "convert", "stitch", "upload")),
        },
        "aux1": {"nats-server.service", "tilepipe.target", "tilepipe-register.service"},
        "aux2": {"nats-server.service"},
    }
    for host in HOSTS:
        files = unit_files(deployment, host)
        assert {p.name for p in files} == expected[host]
        names = [str(p) for p in files if "@." not in p.name]
        names += [n for n in ("tilepipe-process@0.service",) if host == "zircon"]
        verify = run(
            [tool("systemd-analyze"), "verify", *names],
            cwd=deployment.units(host),
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{deployment.units(host)}:"},
        )
        assert verify.returncode == 0 and not verify.stderr.strip(), (host, verify.stderr)
        for path in files:
            text = path.read_text()
            if path.suffix == ".service":
                assert "Restart=on-failure" in text and "NoNewPrivileges=yes" in text
                assert "ProtectSystem=strict" in text
            if path.name.startswith("tilepipe-"):
                assert f"ReadOnlyPaths={deployment.roots['raw']}\n" in text
                writable = f"{deployment.roots['work']} {deployment.roots['output']}"
                assert f"ReadWritePaths={writable}" in text


def test_units_security_exposure(deployment):
    scores = {}
    for host in HOSTS:
        for path in unit_files(deployment, host):
            if path.suffix != ".service":
                continue
            name = path.name.replace("@.", "@0.")
            report = run(
                [tool("systemd-analyze"), "security", "--offline=true", "--no-pager", name],
                cwd=deployment.units(host),
                env={**os.environ, "SYSTEMD_UNIT_PATH": f"{deployment.units(host)}:"},
            )
            found = re.search(r"Overall exposure level for \S+: ([\d.]+)", report.stdout)
            assert found, report.stdout + report.stderr
            scores[f"{host}/{name}"] = float(found[1])
    assert scores and max(scores.values()) <= EXPOSURE_LIMIT, scores


def test_rendered_configs_validate(deployment):
    nats_server = str(find_nats_server())
    for host in HOSTS:
        conf = deployment.prefix(host) / "etc/nats/nats-server.conf"
        checked = run([nats_server, "-t", "-c", str(conf)])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert oct(conf.stat().st_mode & 0o777) == "0o640"
    for host in ("zircon", "aux1"):
        config = load_config(deployment.config(host))
        assert config.nats.url.count("nats://") == 3 and config.nats.replicas == 3
        assert config.roots.raw == deployment.roots["raw"]
        assert stage_settings(config, "process").workers == 2  # one per GPU of zircon
        assert (
            stage_settings(config, "register").enabled and stage_settings(config, "upload").enabled
        )
    prom = deployment.prefix("zircon") / "etc/prometheus/prometheus.yml"
    checked = run([tool("promtool"), "check", "config", str(prom)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {j["job_name"] for j in yaml.safe_load(prom.read_text())["scrape_configs"]}
    assert jobs == {f"tilepipe-{s}" for s in SERVICES}
    grafana = deployment.prefix("zircon") / "var/lib/grafana/dashboards/tilepipe"
    assert sorted(p.name for p in grafana.glob("*.json")) == sorted(
        p.name for p in (REPO / "grafana/dashboards").glob("*.json")
    )


# ---------------------------------------------------------------------------- units as processes
def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (every section; repeated keys kept in order)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@dataclass
class Unit:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log: Path | None = None


def as_process(host: str, path: Path, instance: str, state: Path) -> Unit:
    """What systemd would run for this unit: specifiers %i %d %C, Environment=,
    EnvironmentFile=, LoadCredential= (copied into the credentials directory), ${VAR}."""
    name = path.name.replace("@.", f"@{instance}.") if instance else path.name
    creds = state / host / "credentials" / name
    creds.mkdir(parents=True, exist_ok=True, mode=0o700)
    spec = {"%i": instance, "%d": str(creds), "%C": str(state / host / "cache"), "%%": "%"}

    def expand(text: str) -> str:
        return re.sub(r"%[idC%]", lambda m: spec[m[0]], text)

    settings = unit_settings(path)
    unknown = {m for v in settings.get("ExecStart", []) for m in re.findall(r"%[a-zA-Z]", v)}
    assert unknown <= set(spec), f"{path.name}: specifiers {unknown} not emulated"
    for item in settings.get("LoadCredential", []):
        cred, _, source = expand(item).partition(":")
        shutil.copyfile(source, creds / cred)
        (creds / cred).chmod(0o400)
    env: dict[str, str] = {}
    for item in settings.get("EnvironmentFile", []):
        for line in Path(expand(item)).read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    for item in settings.get("Environment", []):
        for pair in shlex.split(expand(item)):
            key, _, value = pair.partition("=")
            env[key] = value
    (exec_start,) = settings["ExecStart"]
    command = re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], expand(exec_start))
    return Unit(f"{host}/{name}", shlex.split(command), env)


def start(unit: Unit, logs: Path) -> Unit:
    logs.mkdir(exist_ok=True)
    unit.log = logs / f"{unit.name.replace('/', '-')}.log"
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(logs), "LANG": "C.UTF-8"}
    with open(unit.log, "wb") as log:
        unit.proc = subprocess.Popen(
            unit.argv,
            env={**base, **unit.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return unit


def stop(units: list[Unit], timeout: float = 60) -> dict[str, int | None]:
    """SIGTERM each (as systemd does), then wait; kill what does not exit."""
    for unit in units:
        if unit.proc is not None and unit.proc.poll() is None:
            unit.proc.send_signal(signal.SIGTERM)
    codes = {}
    for unit in units:
        if unit.proc is None:
            continue
        try:
            codes[unit.name] = unit.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            unit.proc.kill()
            unit.proc.wait()
            codes[unit.name] = None
    return codes


def alive(units: list[Unit]) -> bool:
    dead = [u for u in units if u.proc is not None and u.proc.poll() is not None]
    assert not dead, {u.name: u.log.read_text(errors="replace")[-2000:] for u in dead}
    return True


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wanted(target: Path) -> list[str]:
    """The units a target pulls in (Wants=)."""
    return [n for line in unit_settings(target).get("Wants", []) for n in line.split()]


async def test_rendered_units_run_a_simulated_acquisition(deployment, tmp_path):
    """The ExecStart lines as plain processes: 3-node NATS with per-service users, every
    service of both hosts (two process workers from the template unit), Prometheus; a 2-slice
    acquisition of 2x2 tiles is processed, stitched, registered on aux1 and uploaded."""
    import nats

    dep = deployment
    logs = tmp_path / "logs"
    state = tmp_path / "state"
    servers = [as_process(h, dep.units(h) / "nats-server.service", "", state) for h in HOSTS]
    services: list[Unit] = []
    for host in ("zircon", "aux1"):
        for name in wanted(dep.units(host) / "tilepipe.target"):
            instance = name.split("@", 1)[1].removesuffix(".service") if "@" in name else ""
            file = re.sub(r"@[^.]*\.", "@.", name)
            services.append(as_process(host, dep.units(host) / file, instance, state))
    assert sorted(u.env["TILEPIPE_NATS__USER"] for u in services) == sorted([*SERVICES, "process"])
    args = (dep.prefix("zircon") / "etc/default/prometheus").read_text().split("ARGS=", 1)[1]
    prometheus = Unit("prometheus", [tool("prometheus"), *shlex.split(shlex.split(args)[0])], {})
    admin = {
        "TILEPIPE_NATS__USER": "admin",
        "TILEPIPE_NATS__PASSWORD_FILE": str(dep.prefix("zircon") / "etc/tilepipe/nats/admin.pass"),
    }
    cli = str(dep.venv_bin("zircon") / "tilepipe")
    zircon_cfg = str(dep.config("zircon"))
    everything = [*servers, *services, prometheus]
    nc = None
    try:
        for unit in servers:
            start(unit, logs)
        for host in HOSTS:
            await wait_for(
                lambda h=host: alive(servers) and port_open("127.0.0.1", dep.ports[h]["client"]),
                timeout=30,
            )

        # provisioning as admin once the cluster has a JetStream leader
        tries: list[str] = []

        async def provisioned() -> bool:
            init = await asyncio.to_thread(
                run, [cli, "init", "--config", zircon_cfg], 60, env={**os.environ, **admin}
            )
            tries.append(init.stdout + init.stderr)
            return init.returncode == 0

        try:
            await wait_for(provisioned, timeout=90, interval=1)
        except AssertionError:
            raise AssertionError(f"tilepipe init never succeeded: {tries[-1:]}") from None
        for unit in services:
            start(unit, logs)
        start(prometheus, logs)

        manifest = write_manifest(
            small_manifest("dep", slices=2, rows=2, cols=2, settle_s=0.2), dep.roots["raw"] / "dep"
        )
        sim = await asyncio.to_thread(
            run, [cli, "simulate", str(manifest), "--rate", "0"], 180, env={**os.environ, **admin}
        )
        assert sim.returncode == 0, sim.stdout + sim.stderr

        nc = await nats.connect(
            [f"nats://127.0.0.1:{dep.ports[h]['client']}" for h in HOSTS],
            user="admin",
            password=Path(admin["TILEPIPE_NATS__PASSWORD_FILE"]).read_text().strip(),
        )
        js = nc.jetstream()

        async def done() -> bool:
            alive(everything)
            registered = await stream_messages(js, "tp.slice_registered.dep.>")
            uploaded = await stream_messages(js, "tp.artifact_uploaded.dep.>")
            return len(registered) == 2 and len(uploaded) > 0

        await wait_for(done, timeout=240, interval=1)
        assert not await stream_messages(js, "tp.stage_failed.dep.>")
        processed = [json.loads(m.data) for m in await stream_messages(js, "tp.tile_processed.>")]
        assert len(processed) == 8
        assert (dep.roots["output"] / "dep/volume/registered.ome.zarr").is_dir()
        assert any(dep.bucket.rglob("*"))

        # every service connected as its own user (NATS monitoring, all three nodes)
        users: list[str] = []
        for host in HOSTS:
            connz = get_json(f"http://127.0.0.1:{dep.ports[host]['monitor']}/connz?auth=true")
            users += [c.get("authorized_user") for c in connz.get("connections", [])]
        assert {*SERVICES} <= set(users), users
        assert users.count("process") == 2, users

        # Prometheus from the rendered config scrapes every service (7 targets, all up)
        prom = f"http://127.0.0.1:{dep.ports['zircon']['prometheus']}"

        def scraped() -> bool:
            alive(everything)
            with contextlib.suppress(OSError):
                targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
                return len(targets) == 7 and all(t["health"] == "up" for t in targets)
            return False

        await wait_for(scraped, timeout=60, interval=1)
        targets = get_json(f"{prom}/api/v1/targets")["data"]["activeTargets"]
        assert {t["labels"]["job"] for t in targets} == {f"tilepipe-{s}" for s in SERVICES}
        assert {t["labels"]["host"] for t in targets} == {"zircon", "aux1"}
        rules = get_json(f"{prom}/api/v1/rules")["data"]["groups"]
        assert rules and all(r["health"] == "ok" for g in rules for r in g["rules"])
    finally:
        if nc is not None:
            await nc.close()
        codes = stop([prometheus, *services])
        stop(servers)
    assert all(code == 0 for code in codes.values()), codes
    violations = [
        line
        for unit in servers
        for line in unit.log.read_text(errors="replace").splitlines()
        if "Permissions Violation" in line
    ]
    assert not violations, violations[:10]


def test_only_an_upload_unit_that_deletes_raw_files_may_write_the_raw_root():
    """The unit template, rendered with Jinja as Ansible does: the raw root stays read-only
    for every unit unless upload is configured to delete raw files after a verified upload."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE_TEMPLATES), trim_blocks=True)
    env.filters["bool"] = lambda v: v in (True, "true", "yes", 1)
    template = env.get_template("tilepipe.service.j2")
    roots = {"raw": "/data/raw", "work": "/data/work", "output": "/data/out"}

    def render(service: str, options: dict) -> str:
        return template.render(
            tilepipe_unit={"service": service, "gpu_template": False},
            tilepipe_stage_settings={service: {"options": options}},
            tilepipe_roots=roots,
            tilepipe_extra_rw_paths=[],
            tilepipe_ports={service: 9400},
            tilepipe_stop_margin_s=30,
        )

    deleting = {"archive_raw": True, "delete_raw_after_verified_upload": True}
    for service, options in (("upload", {}), ("convert", deleting), ("upload", {"x": 1})):
        text = render(service, options)
        assert "ReadOnlyPaths=/data/raw\n" in text
        assert "ReadWritePaths=/data/work /data/out\n" in text
    text = render("upload", deleting)
    assert "ReadOnlyPaths" not in text
    assert "ReadWritePaths=/data/raw /data/work /data/out\n" in text
