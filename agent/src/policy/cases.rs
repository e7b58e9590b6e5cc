//! `policy test`: test cases for a policy directory, decided offline by the same pure
//! [`decide`](super::decide) the proxy runs.
//!
//! A case file is a YAML list of cases; by default `policy test DIR` runs every `*.yaml`
//! (and `*.yml`) in `DIR/tests/`, which the policy loader never reads (it reads only the
//! files directly in `DIR`):
//!
//! ```yaml
//! - name: charges in euro are allowed
//!   workload: billing
//!   request: POST https://api.example.com/v1/charges
//!   headers: ["Idempotency-Key: 42"]     # optional, 'Name: value'
//!   body: {currency: eur, amount: 100}   # optional, any YAML value, sent as JSON
//!   at: 2024-06-03T10:00:00Z             # optional (default: now)
//!   uid: 1001                            # optional (default: the workload's select.uid)
//!   expect: allow                        # allow | deny
//!   rule: create-charge                  # optional: the allowing rule
//! - name: pounds are not
//!   workload: billing
//!   request: POST https://api.example.com/v1/charges
//!   body: {currency: gbp, amount: 100}
//!   expect: deny
//!   reason: json_constraint_failed       # optional: the denial code
//! ```
//!
//! A case decides the policy's rules (destination, method, path, query, headers, body,
//! time window); destination binding (DNS) and rate limits are runtime state and not part
//! of a case. In `mode: audit` the expected decision is the enforce-mode one (what
//! `would_deny` records). Every failing case is one line `file:line:col: case "name": …`;
//! a broken case file is an error with its position, never a skipped case.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::offline::{self, RequestError, Spec};
use super::position::PositionIndex;
use super::{Snapshot, explain};

/// Why the cases cannot be run (as opposed to a case that fails).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CasesError {
    /// A case file or directory cannot be read.
    #[error("{}: cannot read test cases: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No case file was found.
    #[error("{}: no test case files (*.yaml) found", path.display())]
    NoCases {
        /// Where they were looked for.
        path: PathBuf,
    },
    /// A case file is not a list of well-formed cases.
    #[error("{}:{line}:{col}: {message}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
}

/// One case as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    workload: String,
    request: String,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    body: Option<serde_yaml::Value>,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    uid: Option<u32>,
    expect: Expect,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    rule: Option<String>,
}

/// The expected decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        })
    }
}

/// A case that did not give what it expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The case file.
    pub file: PathBuf,
    /// Where the case starts.
    pub line: usize,
    /// Column.
    pub col: usize,
    /// The case's name.
    pub name: String,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: case {:?}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.name,
            self.message
        )
    }
}

/// The result of a run.
#[derive(Debug, Default)]
pub struct Outcome {
    /// How many cases ran.
    pub cases: usize,
    /// The failing ones, in file order.
    pub failures: Vec<Failure>,
}

/// The case files: `paths` (files, or directories whose `*.yaml`/`*.yml` are read), or
/// `DIR/tests/` when none are given. Sorted within a directory.
pub fn case_files(dir: &Path, paths: &[PathBuf]) -> Result<Vec<PathBuf>, CasesError> {
    let default = [dir.join("tests")];
    let roots = if paths.is_empty() {
        &default[..]
    } else {
        paths
    };
    let mut files = Vec::new();
    for root in roots {
        let meta = std::fs::metadata(root).map_err(|source| CasesError::Read {
            path: root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            files.push(root.clone());
            continue;
        }
        let mut found = Vec::new();
        let entries = std::fs::read_dir(root).map_err(|source| CasesError::Read {
            path: root.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| CasesError::Read {
                path: root.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) {
                found.push(entry.path());
            }
        }
        if found.is_empty() {
            return Err(CasesError::NoCases { path: root.clone() });
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// Runs every case of `files` against `snapshot`.
pub fn run(snapshot: &Snapshot, files: &[PathBuf]) -> Result<Outcome, CasesError> {
    let mut outcome = Outcome::default();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|source| CasesError::Read {
            path: file.clone(),
            source,
        })?;
        for (i, case, pos) in parse(file, &text)? {
            outcome.cases += 1;
            if let Err(message) = check(snapshot, &case) {
                outcome.failures.push(Failure {
                    file: file.clone(),
                    line: pos.0,
                    col: pos.1,
                    name: if case.name.is_empty() {
                        format!("#{}", i + 1)
                    } else {
                        case.name.clone()
                    },
                    message,
                });
            }
        }
    }
    Ok(outcome)
}

/// A case with its index in the file and its line and column.
type Located = (usize, RawCase, (usize, usize));

/// The cases of one file with their index and position.
fn parse(file: &Path, text: &str) -> Result<Vec<Located>, CasesError> {
    let invalid = |line: usize, col: usize, message: String| CasesError::Invalid {
        file: file.to_owned(),
        line,
        col,
        message,
    };
    let index = PositionIndex::build(text).map_err(|e| {
        invalid(
            e.pos.line,
            e.pos.col,
            format!("malformed YAML: {}", e.message),
        )
    })?;
    let cases: Vec<RawCase> = serde_yaml::from_str(text).map_err(|e| {
        let (line, col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        let mut message = e.to_string();
        // serde_yaml writes the path of a list item as `.[0].field`; we write `[0].field`.
        if message.starts_with(".[") {
            message.remove(0);
        }
        if let Some(l) = e.location() {
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            message = message.replace(&suffix, "");
        }
        invalid(line, col, format!("not a list of test cases: {message}"))
    })?;
    if cases.is_empty() {
        return Err(invalid(1, 1, "the file has no test cases".to_owned()));
    }
    let mut out = Vec::with_capacity(cases.len());
    for (i, case) in cases.into_iter().enumerate() {
        let pos = index.locate(&format!("[{i}]"));
        if case.expect == Expect::Allow && case.reason.is_some() {
            return Err(invalid(
                pos.line,
                pos.col,
                format!(
                    "case {:?}: `reason` is for `expect: deny` (an allow has a `rule`)",
                    case.name
                ),
            ));
        }
        if case.expect == Expect::Deny && case.rule.is_some() {
            return Err(invalid(
                pos.line,
                pos.col,
                format!(
                    "case {:?}: `rule` is for `expect: allow` (a denial has a `reason`)",
                    case.name
                ),
            ));
        }
        out.push((i, case, (pos.line, pos.col)));
    }
    Ok(out)
}

/// Decides one case: Ok when it gives what it expects, else what it gave.
fn check(snapshot: &Snapshot, case: &RawCase) -> Result<(), String> {
    let body = match &case.body {
        None => None,
        Some(value) => Some(
            serde_json::to_vec(value)
                .map_err(|e| format!("body: cannot be written as JSON: {e}"))?,
        ),
    };
    let spec = Spec {
        request: &case.request,
        headers: &case.headers,
        body: body.as_deref().map(|b| (b, "body".to_owned())),
        at: case.at.as_deref(),
        uid: case.uid,
    };
    let prepared = offline::workload(snapshot, &case.workload)
        .and_then(|(id, w)| offline::prepare(id, w, &spec))
        .map_err(|e: RequestError| {
            // Rename the explain flags to the case's keys.
            e.to_string()
                .replacen("--workload ", "workload ", 1)
                .replacen("--request ", "request ", 1)
                .replacen("--header ", "header ", 1)
                .replacen("--at ", "at ", 1)
        })?;
    let got = explain(snapshot, &prepared.request());
    let decision = got.decision;
    match case.expect {
        Expect::Allow if decision == "allow" => match &case.rule {
            Some(want) if got.rule.as_deref() != Some(want.as_str()) => Err(format!(
                "expected allow by rule {want}, got allow by rule {}",
                got.rule.as_deref().unwrap_or("?")
            )),
            _ => Ok(()),
        },
        Expect::Deny if decision != "allow" => match &case.reason {
            Some(want) if got.code != Some(want.as_str()) => Err(format!(
                "expected deny {want}, got deny {}: {}",
                got.code.unwrap_or("?"),
                got.reason.as_deref().unwrap_or("?")
            )),
            _ => Ok(()),
        },
        Expect::Allow => Err(format!(
            "expected allow, got deny {}: {}",
            got.code.unwrap_or("?"),
            got.reason.as_deref().unwrap_or("?")
        )),
        Expect::Deny => Err(format!(
            "expected deny{}, got allow by rule {} of {}",
            case.reason
                .as_deref()
                .map(|r| format!(" {r}"))
                .unwrap_or_default(),
            got.rule.as_deref().unwrap_or("?"),
            got.destination.as_deref().unwrap_or("?")
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const POLICY: &str = "\
workload: billing
select: {cgroup: /billing, uid: 1001}
egress:
  - host: api.example.com
    port: 443
    rules:
      - id: create-charge
        methods: [POST]
        path: /v1/charges
        json:
          - {field: currency, one_of: [usd, eur]}
      - id: office-hours
        methods: [GET]
        path: /v1/report
        when: {days: [mon, tue, wed, thu, fri], hours: '08:00-18:00', timezone: UTC}
";

    struct Env {
        dir: tempfile::TempDir,
    }

    impl Env {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("billing.yaml"), POLICY).unwrap();
            std::fs::create_dir(dir.path().join("tests")).unwrap();
            Self { dir }
        }

        fn cases(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join("tests").join(name);
            std::fs::write(&path, text).unwrap();
            path
        }

        fn run(&self, paths: &[PathBuf]) -> Result<Outcome, CasesError> {
            let snapshot = Snapshot::load_dir(self.dir.path()).unwrap();
            run(&snapshot, &case_files(self.dir.path(), paths)?)
        }
    }

    const PASSING: &str = "\
- name: euro charge
  workload: billing
  request: POST https://api.example.com/v1/charges
  body: {currency: eur, amount: 100}
  expect: allow
  rule: create-charge
- name: pounds are refused
  workload: billing
  request: POST https://api.example.com/v1/charges
  body: {currency: gbp}
  expect: deny
  reason: json_constraint_failed
- name: report on a Monday morning
  workload: billing
  request: GET https://api.example.com/v1/report
  at: 2024-06-03T10:00:00Z
  expect: allow
- name: not on Sunday
  workload: billing
  request: GET https://api.example.com/v1/report
  at: 2024-06-02T10:00:00Z
  expect: deny
  reason: outside_time_window
- name: another host
  workload: billing
  request: GET https://evil.example.com/
  expect: deny
  reason: destination_not_allowed
";

    #[test]
    fn passing_cases_pass_and_the_policy_loader_ignores_them() {
        let env = Env::new();
        env.cases("billing.yaml", PASSING);
        // The cases live beside the policies: the directory still loads one workload.
        let snapshot = Snapshot::load_dir(env.dir.path()).unwrap();
        assert_eq!(snapshot.workloads().len(), 1);
        let outcome = env.run(&[]).unwrap();
        assert_eq!(outcome.cases, 5);
        assert!(outcome.failures.is_empty(), "{:#?}", outcome.failures);
    }

    #[test]
    fn each_failing_case_is_one_line_with_its_position() {
        let env = Env::new();
        let file = env.cases(
            "wrong.yaml",
            "\
- name: wrong decision
  workload: billing
  request: POST https://api.example.com/v1/charges
  body: {currency: gbp}
  expect: allow
- name: wrong reason
  workload: billing
  request: DELETE https://api.example.com/v1/charges
  expect: deny
  reason: path_not_allowed
- name: wrong rule
  workload: billing
  request: POST https://api.example.com/v1/charges
  body: {currency: usd}
  expect: allow
  rule: office-hours
- name: wrongly expected deny
  workload: billing
  request: POST https://api.example.com/v1/charges
  body: {currency: usd}
  expect: deny
- name: unknown workload
  workload: payroll
  request: GET https://api.example.com/
  expect: deny
- name: broken body
  workload: billing
  request: POST https://api.example.com/v1/charges
  headers: ['Content-Type: text/plain']
  body: {currency: usd}
  expect: allow
",
        );
        let outcome = env.run(std::slice::from_ref(&file)).unwrap();
        assert_eq!(outcome.cases, 6);
        let lines: Vec<String> = outcome.failures.iter().map(ToString::to_string).collect();
        let f = file.display();
        assert_eq!(
            lines,
            [
                format!(
                    "{f}:1:3: case \"wrong decision\": expected allow, got deny \
                     json_constraint_failed: rule create-charge: json field currency must be \
                     one of [\"usd\", \"eur\"]"
                ),
                format!(
                    "{f}:6:3: case \"wrong reason\": expected deny path_not_allowed, got deny \
                     method_not_allowed: rule create-charge: method DELETE is not allowed \
                     (allowed: POST)"
                ),
                format!(
                    "{f}:11:3: case \"wrong rule\": expected allow by rule office-hours, got \
                     allow by rule create-charge"
                ),
                format!(
                    "{f}:17:3: case \"wrongly expected deny\": expected deny, got allow by rule \
                     create-charge of api.example.com:443"
                ),
                format!(
                    "{f}:22:3: case \"unknown workload\": workload \"payroll\": no such \
                     workload in the policy directory (known: billing)"
                ),
                format!(
                    "{f}:26:3: case \"broken body\": body: content type \"text/plain\" is not \
                     JSON (expected application/json or application/*+json) (the proxy answers \
                     415 unsupported_media_type)"
                ),
            ]
        );
    }

    #[test]
    fn broken_case_files_are_errors_with_their_position() {
        let env = Env::new();
        for (text, want) in [
            ("- name: [unclosed\n", ":2:1: malformed YAML"),
            ("name: not a list\n", ":1:1: not a list of test cases"),
            ("[]\n", ":1:1: the file has no test cases"),
            (
                "- name: x\n  workload: billing\n  request: GET https://a/\n  expect: maybe\n",
                ":4:11: not a list of test cases: [0].expect: unknown variant `maybe`",
            ),
            (
                "- name: x\n  workload: billing\n  request: GET https://a/\n  expect: deny\n  \
                 typo: 1\n",
                ": not a list of test cases: [0]: unknown field `typo`",
            ),
            (
                "- name: x\n  workload: billing\n  request: GET https://a/\n  expect: deny\n\
                 - name: y\n  workload: billing\n  request: GET https://a/\n  expect: allow\n  \
                 reason: path_not_allowed\n",
                ":5:3: case \"y\": `reason` is for `expect: deny`",
            ),
            ("", ":1:1: the file has no test cases"),
            ("# only a comment\n", ":1:1: the file has no test cases"),
        ] {
            let file = env.cases("broken.yaml", text);
            let e = env.run(&[file]).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains("broken.yaml:"), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_shipped_example_cases_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let snapshot = Snapshot::load_dir(&dir).unwrap();
        let files = case_files(&dir, &[]).unwrap();
        assert!(files.len() >= 2, "{files:?}");
        let outcome = run(&snapshot, &files).unwrap();
        assert!(outcome.cases >= 10, "{outcome:?}");
        let lines: Vec<String> = outcome.failures.iter().map(ToString::to_string).collect();
        assert!(lines.is_empty(), "{lines:#?}");
    }

    #[test]
    fn a_directory_without_cases_is_an_error() {
        let env = Env::new();
        let e = env.run(&[]).unwrap_err().to_string();
        assert!(
            e.ends_with("tests: no test case files (*.yaml) found"),
            "{e}"
        );
        let e = env
            .run(&[env.dir.path().join("missing.yaml")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.yaml: cannot read test cases"), "{e}");
    }
}
