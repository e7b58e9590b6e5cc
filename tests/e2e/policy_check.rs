//! `scopegate policy check` as CI runs it, through the built binary: a file or a
//! directory, secrets read only with `--secrets`, warnings for an empty directory, ignored
//! entries and a selector that matches no cgroup on this host (a real cgroup, so that
//! test is privileged), exit 0 / 1 / 2 (`--strict`), and the packaged unit's
//! `ExecStartPre=` command line.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    path::Path,
    process::{Command, Output, Stdio},
};

use scopegate_e2e::*;

fn policy(secret: &str) -> String {
    policy_selecting("systemd_unit: crm.service", secret)
}

/// The crm policy with the selector `select` (one line, e.g. `cgroup: /a/b`).
fn policy_selecting(select: &str, secret: &str) -> String {
    format!(
        "workload: crm\nselect:\n  {select}\negress:\n  - host: api.example.com\n    port: 443\n    tls: intercept\n    credential:\n      header: Authorization\n      format: \"Bearer {{secret}}\"\n      secret_file: {secret}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /v1/**\n"
    )
}

fn check(args: &[&str], path: &Path) -> (Option<i32>, String, String) {
    let out: Output = Command::new(bin())
        .args(["policy", "check"])
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_check_for_ci_file_dir_secrets_warnings_and_exit_codes() {
    // Privileged for the real cgroup the policy selects (a selector that matches no cgroup
    // on this host is a warning, below).
    privileged_test("policy_check_for_ci_file_dir_secrets_warnings_and_exit_codes");
    let tree = CgroupTree::new();
    let crm = tree.child("crm");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crm.yaml");
    let missing = "/nonexistent/sgobs-ci-secret";
    fs::write(&file, policy_selecting(&format!("cgroup: {crm}"), missing)).unwrap();

    // A directory and a file; the secret is not read without --secrets. A `tests/`
    // subdirectory holds `policy test` cases: known, no warning even under --strict.
    fs::create_dir(dir.path().join("tests")).unwrap();
    let (code, out, err) = check(&["--strict"], dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("OK, 1 workload(s)"), "{out}");
    let (code, out, err) = check(&["--strict"], &file);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with(&format!("{}: OK", file.display())), "{out}");
    assert!(!err.contains("warning"), "{err}");

    // A selector that matches no cgroup on this host is a warning naming the file and
    // the workload: exit 0, and 2 under --strict.
    let nobody = dir.path().join("nobody.yaml");
    let text = policy_selecting(&format!("cgroup: {}/nobody", tree.path), missing)
        .replace("workload: crm", "workload: nobody");
    fs::write(&nobody, text).unwrap();
    let (code, out, err) = check(&[], dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("OK, 2 workload(s), 1 warning(s)"), "{out}");
    let want = format!(
        "scopegate: warning: {}: workload nobody: its selector",
        nobody.display()
    );
    assert!(err.lines().any(|l| l.starts_with(&want)), "{want}\n{err}");
    assert!(err.contains("matches no cgroup on this host"), "{err}");
    assert!(!err.contains("workload crm:"), "{err}");
    let (code, out, err) = check(&["--strict"], dir.path());
    assert_eq!(code, Some(2), "{out}{err}");
    // Once the cgroup exists, the warning is gone.
    tree.child("nobody");
    let (code, out, err) = check(&["--strict"], dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
    fs::remove_file(&nobody).unwrap();

    // With --secrets the missing secret is an error naming the file, line and column.
    let (code, out, _) = check(&["--secrets"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    let want = format!(
        "{}:11:20: egress[0].credential.secret_file: \"{missing}\": cannot be read (missing or not readable)",
        file.display()
    );
    assert!(out.lines().any(|l| l == want), "{want}\n{out}");
    let (code, _, _) = check(&["--secrets"], &file);
    assert_eq!(code, Some(1));

    // Ignored entries warn (stderr), and fail only under --strict (exit 2).
    fs::write(dir.path().join("README.md"), "# policies\n").unwrap();
    fs::write(dir.path().join("crm.yaml.orig"), "not yaml: [").unwrap();
    fs::create_dir(dir.path().join("old")).unwrap();
    let (code, out, err) = check(&[], dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("old: ignored: a directory") && !err.contains("tests: ignored"),
        "{err}"
    );
    for name in ["README.md", "crm.yaml.orig"] {
        let want = format!(
            "scopegate: warning: {}: ignored: not named *.yaml or *.yml",
            dir.path().join(name).display()
        );
        assert!(err.lines().any(|l| l == want), "{want}\n{err}");
    }
    assert_eq!(check(&["--strict"], dir.path()).0, Some(2));

    // An empty directory warns; exit 2 under --strict.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = check(&[], empty.path());
    assert_eq!(code, Some(0));
    assert!(err.contains("no policy files"), "{err}");
    assert_eq!(check(&["--strict"], empty.path()).0, Some(2));

    // An error beats warnings: exit 1 even under --strict.
    fs::write(
        dir.path().join("broken.yaml"),
        "workload: crm2\nselect: {}\negress: []\n",
    )
    .unwrap();
    let (code, out, _) = check(&["--strict"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("broken.yaml:2:"), "{out}");
}

#[test]
fn the_units_exec_start_pre_checks_the_policies_and_their_secrets() {
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/scopegate.service"),
    )
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .expect("the unit has an ExecStartPre=");
    // `-`: its exit status is ignored (systemd's RestartPreventExitStatus= looks only at
    // the main process, so a failing ExecStartPre would be restarted without end); `run`
    // exits 78 on the same errors.
    let line = line
        .strip_prefix('-')
        .unwrap_or_else(|| panic!("ExecStartPre= without `-`: {line}"));
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/scopegate"), "{line}");
    let args: Vec<&str> = words.collect();
    assert_eq!(args.last(), Some(&"/etc/scopegate/policies"), "{line}");
    let run = |dir: &Path| {
        let mut args = args.clone();
        args.pop();
        Command::new(bin())
            .args(&args)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("crm");
    fs::write(&secret, "k").unwrap();
    fs::write(
        dir.path().join("crm.yaml"),
        policy(&secret.display().to_string()),
    )
    .unwrap();
    // A README beside the policies does not stop the service from starting.
    fs::write(dir.path().join("README"), "notes\n").unwrap();
    let out = run(dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // A secret the agent could not read stops it before `run`, naming the file.
    fs::remove_file(&secret).unwrap();
    let out = run(dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("crm.yaml:11:20: "),
        "{out:?}"
    );
}
