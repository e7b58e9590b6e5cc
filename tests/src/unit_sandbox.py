# The sandbox of a systemd service unit, applied to one command without systemd (systemd is
# not PID 1 on the test machines, so the unit cannot be started there).
#
# Run as root inside `unshare --mount --propagation private`, with Debian's python3
# (python3-seccomp):
#   /usr/bin/python3 -c SCRIPT --unit UNIT [--map KEY=PATH]... -- COMMAND ARGS...
#
# It reads the unit's [Service] section and applies, in systemd's order, what decides
# whether the service can work at all:
#   ProtectSystem=strict (every mount read-only but /dev and /proc), ProtectKernelTunables=
#   and ProtectControlGroups= (/proc/sys, /sys and the cgroup tree read-only), then the
#   writable paths: StateDirectory=, LogsDirectory=, RuntimeDirectory= and each
#   ReadWritePaths= entry, each mapped by --map KEY=PATH (KEY is the directive, or for
#   ReadWritePaths= the unit's path) to the test's own directory, which must exist;
#   LimitNOFILE=, Environment=, UMask=;
#   the user's credentials: SecureBits=, CapabilityBoundingSet=, AmbientCapabilities=,
#   NoNewPrivileges= (through setpriv), SupplementaryGroups= (with --map
#   SupplementaryGroups=NAME=GID, the group the package creates);
#   SystemCallFilter= with systemd's own group definitions (`systemd-analyze
#   syscall-filter`), SystemCallErrorNumber= and RestrictAddressFamilies= (libseccomp).
# Not emulated (they hide things, they do not take away what the agent needs; each is
# printed): PrivateTmp=, PrivateDevices=, ProtectHome=, ProtectKernelModules=,
# ProtectKernelLogs=, ProtectClock=, ProtectHostname=, RestrictNamespaces=,
# MemoryDenyWriteExecute=, RestrictRealtime=, LockPersonality=, and the rest.
# A directive it does not know is an error: the emulation must not silently fall behind
# the unit.
import errno
import os
import resource
import shlex
import subprocess
import sys
import tempfile

APPLIED = {
    "ProtectSystem", "ProtectKernelTunables", "ProtectControlGroups", "StateDirectory",
    "LogsDirectory", "RuntimeDirectory", "ReadWritePaths", "LimitNOFILE", "Environment",
    "UMask", "SecureBits", "CapabilityBoundingSet", "AmbientCapabilities",
    "NoNewPrivileges", "SystemCallFilter", "SystemCallErrorNumber",
    "RestrictAddressFamilies", "SupplementaryGroups",
}
NOT_EMULATED = {
    "PrivateTmp", "PrivateDevices", "DevicePolicy", "ProtectHome", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset",
    "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    "MemoryDenyWriteExecute", "RemoveIPC", "KeyringMode", "SystemCallArchitectures",
}
# Directives about starting and supervising, not about the process's sandbox.
SUPERVISION = {
    "Type", "NotifyAccess", "ExecStartPre", "ExecStart", "ExecReload", "Restart",
    "RestartSec", "RestartPreventExitStatus", "TimeoutStartSec", "TimeoutStopSec",
    "WatchdogSec", "StateDirectoryMode", "LogsDirectoryMode", "ConfigurationDirectory",
    "ConfigurationDirectoryMode", "RuntimeDirectoryMode",
}


def fail(message):
    print(f"unit_sandbox: {message}", file=sys.stderr)
    sys.exit(125)


def parse_service(path):
    service, section, pending = {}, None, ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = pending + raw.rstrip("\n")
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            text = line.strip()
            if not text or text[0] in "#;":
                continue
            if text.startswith("["):
                section = text
                continue
            if section == "[Service]":
                key, sep, value = text.partition("=")
                if not sep:
                    fail(f"{path}: not a directive: {text!r}")
                service.setdefault(key.strip(), []).append(value.strip())
    return service


def last(service, key, default=None):
    values = service.get(key)
    return values[-1] if values else default


def run(*argv):
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"{' '.join(argv)}: {done.stderr.strip()}")


def mount_points():
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            points.append(point)
    return points


def under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def read_only_mounts(service):
    strict = last(service, "ProtectSystem") == "strict"
    tunables = last(service, "ProtectKernelTunables") == "yes"
    cgroups = last(service, "ProtectControlGroups") == "yes"
    if last(service, "ProtectSystem") not in (None, "strict"):
        fail(f"ProtectSystem={last(service, 'ProtectSystem')} is not emulated")
    for point in mount_points():
        if under(point, "/proc") or under(point, "/dev"):
            continue
        if under(point, "/sys"):
            if not (strict or tunables or (cgroups and under(point, "/sys/fs/cgroup"))):
                continue
        elif not strict:
            continue
        # Per-mount read-only (the superblock is untouched): what systemd does too.
        run("mount", "-o", "remount,bind,ro", point)
    if tunables:
        run("mount", "--bind", "/proc/sys", "/proc/sys")
        run("mount", "-o", "remount,bind,ro", "/proc/sys")


def writable(service, maps):
    wanted = []
    for key in ("StateDirectory", "LogsDirectory", "RuntimeDirectory"):
        if service.get(key):
            if key not in maps:
                fail(f"the unit has {key}=; map it with --map {key}=PATH")
            wanted.append(maps.pop(key))
    for value in service.get("ReadWritePaths", []):
        for path in value.split():
            path = path.lstrip("-")
            if path not in maps:
                fail(f"the unit has ReadWritePaths={path}; map it with --map {path}=PATH")
            wanted.append(maps.pop(path))
    for path in wanted:
        if not os.path.isdir(path):
            fail(f"mapped directory {path} does not exist")
        run("mount", "--bind", path, path)
        run("mount", "-o", "remount,bind,rw", path)


def limits_and_environment(service):
    nofile = last(service, "LimitNOFILE")
    if nofile:
        soft, _, hard = nofile.partition(":")
        soft, hard = int(soft), int(hard or soft)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError):
            # Raising the hard limit needs CAP_SYS_RESOURCE, which root lacks on some
            # machines (systemd as PID 1 has it): keep the host's hard limit.
            host = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            print(f"unit_sandbox: LimitNOFILE={nofile} clamped to the host's hard limit {host}",
                  file=sys.stderr)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, host), min(hard, host)))
    for value in service.get("Environment", []):
        for pair in shlex.split(value):
            name, _, text = pair.partition("=")
            os.environ[name] = text
    umask = last(service, "UMask")
    if umask:
        os.umask(int(umask, 8))


def caps(value):
    names = [c.lower().removeprefix("cap_") for c in value.split()]
    return ",".join("+" + n for n in names)


def setpriv_argv(service, gids):
    argv = ["setpriv"]
    bits = []
    for value in service.get("SecureBits", []):
        bits += ["+" + b.replace("-", "_") for b in value.split()]
    if bits:
        argv += ["--securebits", ",".join(bits)]
    bounding = service.get("CapabilityBoundingSet")
    if bounding is not None:
        names = " ".join(bounding)
        argv += ["--bounding-set", "-all" + ("," + caps(names) if names.strip() else "")]
    ambient = " ".join(service.get("AmbientCapabilities", []))
    if ambient.strip():
        argv += ["--inh-caps", caps(ambient), "--ambient-caps", caps(ambient)]
    if gids:
        argv += ["--groups", ",".join(gids)]
    if last(service, "NoNewPrivileges") == "yes":
        argv.append("--no-new-privs")
    return argv


def supplementary_groups(service, maps):
    """The unit's groups, each mapped to a GID; the host does not have them (the package
    creates them), so this mount namespace sees an /etc/group that has them."""
    names = " ".join(service.get("SupplementaryGroups", [])).split()
    gids, lines = [], []
    for name in names:
        gid = maps.pop("SupplementaryGroups=" + name, None)
        if gid is None:
            fail(f"the unit has SupplementaryGroups={name}; map it with --map SupplementaryGroups={name}=GID")
        gids.append(gid)
        lines.append(f"{name}:x:{gid}:\n")
    if lines:
        with open("/etc/group", encoding="utf-8") as f:
            host = [l for l in f if l.split(":")[0] not in names]
        fd, path = tempfile.mkstemp(prefix="unit-sandbox-group.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(host + lines)
        os.chmod(path, 0o644)
        run("mount", "--bind", path, "/etc/group")
        os.unlink(path)
    return gids


def syscall_groups():
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                         text=True, check=True).stdout
    groups, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
        elif not line.strip():
            current = None
    return groups


def expand(items, groups):
    names = set()
    for item in items:
        if item.startswith("@"):
            if item not in groups:
                fail(f"unknown system call group {item}")
            names |= expand(groups[item], groups)
        else:
            names.add(item)
    return names


def seccomp_stage(service):
    """The filter, built now (systemd-analyze runs before it), loaded by the last stage."""
    filters = service.get("SystemCallFilter", [])
    groups = syscall_groups()
    allowed = None
    for value in filters:
        if not value:
            allowed = None
            continue
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if allowed is None:
            if deny:
                fail("a deny-list SystemCallFilter= first is not emulated")
            # An allow list always lets @default through (systemd.exec(5)).
            allowed = expand(["@default"], groups) | names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    error = last(service, "SystemCallErrorNumber", "EPERM")
    families = " ".join(service.get("RestrictAddressFamilies", [])).split()
    return {"allowed": sorted(allowed or []), "errno": error, "families": families,
            "filter": allowed is not None}


LOADER = r"""
import errno, json, os, socket, sys
import seccomp
spec = json.loads(sys.argv[1])
argv = sys.argv[2:]
if spec["filter"] or spec["families"]:
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(getattr(errno, spec["errno"])))
    allowed = set(spec["allowed"]) if spec["filter"] else None
    for name in spec["allowed"]:
        if spec["families"] and name in ("socket", "socketpair"):
            continue
        try:
            f.add_rule(seccomp.ALLOW, name)
        except Exception:
            pass  # not a system call of this architecture: systemd skips it too
    if spec["families"]:
        for name in ("socket", "socketpair"):
            if allowed is not None and name not in allowed:
                continue
            for family in spec["families"]:
                f.add_rule(seccomp.ALLOW, name, seccomp.Arg(0, seccomp.EQ, getattr(socket, family)))
    f.load()
os.execv(argv[0], argv)
"""


def main():
    args = sys.argv[1:]
    if "--" not in args:
        fail("usage: --unit UNIT [--map KEY=PATH]... -- COMMAND ARGS...")
    split = args.index("--")
    options, command = args[:split], args[split + 1:]
    unit, maps = None, {}
    it = iter(options)
    for option in it:
        if option == "--unit":
            unit = next(it)
        elif option == "--map":
            key, _, path = next(it).partition("=")
            if key == "SupplementaryGroups":
                name, _, gid = path.partition("=")
                if not gid.isdigit():
                    fail(f"--map SupplementaryGroups={path}: NAME=GID expected")
                maps["SupplementaryGroups=" + name] = gid
            else:
                maps[key] = path
        else:
            fail(f"unknown option {option}")
    if unit is None or not command:
        fail("--unit and a command are required")
    service = parse_service(unit)
    unknown = set(service) - APPLIED - NOT_EMULATED - SUPERVISION
    if unknown:
        fail(f"{unit}: directives the emulation does not know: {sorted(unknown)}")
    for key in sorted(NOT_EMULATED & set(service)):
        print(f"unit_sandbox: not emulated: {key}={last(service, key)}", file=sys.stderr)
    if service.get("User") or service.get("DynamicUser"):
        fail("User=/DynamicUser= is not emulated")
    spec = seccomp_stage(service)
    gids = supplementary_groups(service, maps)
    read_only_mounts(service)
    writable(service, maps)
    limits_and_environment(service)
    privileges = setpriv_argv(service, gids)
    if maps:
        fail(f"maps the unit does not use: {sorted(maps)}")
    import json
    loader = ["/usr/bin/python3", "-c", LOADER, json.dumps(spec)]
    os.execvp(privileges[0], privileges + loader + command)


main()
