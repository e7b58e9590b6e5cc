//! Tests of the audit subsystem: writer, chain continuation, failures, tampering, CLI.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8},
    },
    thread,
    time::{Duration, Instant},
};

use super::{
    chain::StoredRecord,
    cli::{AuditCommand, run_to},
    sink::{numbered, rotated_set},
    verify::{DamageKind, Report, VerifyOptions, verify},
    writer::BACKLOG_MAX,
    *,
};

// ---------------------------------------------------------------- helpers

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn records(path: &Path) -> Vec<StoredRecord> {
    query::read_records(path).unwrap()
}

fn file_sinks(path: &Path) -> Sinks {
    Sinks {
        stdout: false,
        file: Some(path.to_path_buf()),
        ..Sinks::default()
    }
}

fn sample(i: usize) -> Record {
    let mut r = Record::new("http").with_dst_addr("192.0.2.7:443".parse().unwrap());
    r.workload = Some(
        if i.is_multiple_of(3) {
            "billing"
        } else {
            "search"
        }
        .into(),
    );
    r.cgroup = Some("/system.slice/billing.service".into());
    r.pid = Some(4242);
    r.uid = Some(1001);
    r.dst.host = Some("api.example.com".into());
    r.method = Some("POST".into());
    r.path = Some(format!("/v1/charges/{i}"));
    r.decision = if i.is_multiple_of(2) {
        Decision::Allow
    } else {
        Decision::Deny
    };
    r.rule = (i.is_multiple_of(2)).then(|| "create-charge".into());
    r.reason = (i % 2 == 1).then(|| "path_not_allowed".into());
    r.status = Some(if i.is_multiple_of(2) { 200 } else { 403 });
    r.request_id = Some(format!("req-{i}"));
    r
}

/// Starts an auditor with `sinks`, records `n` samples, stops it.
fn write_with(sinks: &Sinks, n: usize) {
    let (auditor, handle) = Auditor::start(sinks).unwrap();
    for i in 0..n {
        auditor.record(sample(i));
    }
    drop(auditor);
    handle.join().unwrap();
}

fn check(files: &[PathBuf]) -> Report {
    verify(&VerifyOptions {
        files: files.to_vec(),
        ..VerifyOptions::default()
    })
    .unwrap()
}

fn assert_contiguous(recs: &[StoredRecord], from: u64) {
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, from + i as u64, "seq not contiguous at index {i}");
        if i > 0 {
            assert_eq!(r.prev, recs[i - 1].hash, "chain broken at seq {}", r.seq);
        }
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn raw_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .split_inclusive('\n')
        .map(str::to_owned)
        .collect()
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
    io::Write::write_all(&mut f, bytes).unwrap();
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.concat()).unwrap();
}

/// A stdout stand-in.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl io::Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Fault injection for the file sink (also used by the DNS proxy's tests).
#[derive(Clone, Default)]
pub(crate) struct Faults {
    /// 0: writes work; 1: fail (ENOSPC) without writing; 2: write half, then fail.
    write: Arc<AtomicU8>,
    /// fsync fails (EIO).
    sync: Arc<AtomicBool>,
}

impl Faults {
    pub(crate) fn set_write(&self, mode: u8) {
        self.write.store(mode, std::sync::atomic::Ordering::SeqCst);
    }

    fn set_sync(&self, fail: bool) {
        self.sync.store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn opener(&self) -> SinkOpener {
        let faults = self.clone();
        Box::new(move |path| {
            Ok(Box::new(FlakyFile {
                inner: sink::open_append(path)?,
                faults: faults.clone(),
            }))
        })
    }
}

struct FlakyFile {
    inner: File,
    faults: Faults,
}

impl SinkFile for FlakyFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.faults.write.load(std::sync::atomic::Ordering::SeqCst) {
            0 => io::Write::write_all(&mut self.inner, buf),
            1 => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => {
                io::Write::write_all(&mut self.inner, &buf[..buf.len() / 2])?;
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }
        }
    }

    fn sync_data(&mut self) -> io::Result<()> {
        if self.faults.sync.load(std::sync::atomic::Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.inner.sync_data()
        }
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

// ---------------------------------------------------------------- one record per decision

#[test]
fn one_record_per_guard_finished_or_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (auditor, handle) = Auditor::start(&file_sinks(&path)).unwrap();
    let mut g = auditor.guard(Record::new("http"));
    g.record_mut().workload = Some("billing".into());
    g.finish(
        Decision::Deny,
        Some(403),
        Some("path_not_allowed"),
        Some(Fault::Policy),
    );
    {
        let _dropped = auditor.guard(Record::new("http"));
    }
    let g = auditor.guard(Record::new("http"));
    g.finish(Decision::Allow, Some(200), None, None);
    // A guard whose task panics still records exactly once.
    let a = auditor.clone();
    let _ = thread::spawn(move || {
        let mut g = a.guard(Record::new("http"));
        g.record_mut().request_id = Some("panicked".into());
        panic!("handler panicked");
    })
    .join();
    auditor.guard(Record::new("http")).finish_unavailable();
    drop(auditor);
    handle.join().unwrap();
    let records = json_lines(&path);
    assert_eq!(records.len(), 5);
    assert_eq!(records[0]["seq"], 1);
    assert_eq!(records[0]["decision"], "deny");
    assert_eq!(records[0]["reason"], "path_not_allowed");
    assert_eq!(records[0]["origin"], "policy");
    assert_eq!(records[0]["workload"], "billing");
    assert_eq!(records[1]["seq"], 2);
    assert_eq!(records[1]["decision"], "error");
    assert_eq!(records[1]["reason"], "aborted");
    assert_eq!(records[1]["origin"], "agent");
    assert_eq!(records[2]["decision"], "allow");
    assert_eq!(records[2]["status"], 200);
    assert!(records[2]["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(records[3]["request_id"], "panicked");
    assert_eq!(records[3]["reason"], "aborted");
    assert_eq!(records[4]["decision"], "deny");
    assert_eq!(records[4]["status"], 503);
    assert_eq!(records[4]["reason"], "audit_unavailable");
    assert_eq!(records[4]["origin"], "agent");
    assert!(check(&[path]).ok());
}

#[test]
fn timestamps_are_utc_microseconds() {
    let ts = now_rfc3339();
    assert!(ts.ends_with('Z'), "{ts}");
    let frac = ts.rsplit('.').next().unwrap();
    assert_eq!(frac.len(), 7, "{ts}"); // 6 digits + Z
}

#[test]
fn unopenable_file_is_a_clear_error() {
    let err = Auditor::start(&file_sinks(Path::new("/nonexistent-dir/audit.jsonl"))).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent-dir/audit.jsonl"),
        "{err}"
    );
}

#[test]
fn burst_of_n_records_gives_n_contiguous_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (auditor, handle) = Auditor::start(&file_sinks(&path)).unwrap();
    const THREADS: usize = 4;
    const EACH: usize = 5_000;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let a = auditor.clone();
            thread::spawn(move || {
                for i in 0..EACH {
                    let mut g = a.guard(sample(i));
                    g.record_mut().request_id = Some(format!("{t}-{i}"));
                    g.finish(Decision::Allow, Some(200), None, None);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let metrics_before = auditor.metrics();
    drop(auditor);
    handle.join().unwrap();
    let recs = records(&path);
    assert_eq!(recs.len(), THREADS * EACH);
    assert_eq!(raw_lines(&path).len(), THREADS * EACH);
    assert_contiguous(&recs, 1);
    let mut ids: Vec<_> = recs.iter().map(|r| r.request_id.clone().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), THREADS * EACH, "every decision exactly once");
    assert!(!metrics_before.unhealthy);
    let report = check(&[path]);
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, (THREADS * EACH) as u64);
}

#[test]
fn stdout_and_file_get_the_same_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let out = SharedBuf::default();
    let sinks = Sinks {
        stdout: true,
        ..file_sinks(&path)
    };
    let (auditor, handle) =
        Auditor::start_with(&sinks, sink::default_opener(), Box::new(out.clone())).unwrap();
    for i in 0..100 {
        auditor.record(sample(i));
    }
    drop(auditor);
    handle.join().unwrap();
    let stdout = out.0.lock().unwrap().clone();
    assert_eq!(stdout, fs::read(&path).unwrap());
}

// ---------------------------------------------------------------- chain continuation

#[test]
fn chain_continues_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_with(&file_sinks(&path), 5);
    write_with(&file_sinks(&path), 5);
    write_with(&file_sinks(&path), 1);
    let recs = records(&path);
    assert_eq!(recs.len(), 11);
    assert_eq!(recs[0].prev, chain::GENESIS);
    assert_contiguous(&recs, 1);
    let report = check(&[path]);
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(11)));
}

#[test]
fn size_rotation_continues_the_chain_and_verify_walks_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sinks = Sinks {
        rotation: Rotation {
            max_bytes: Some(4000),
            ..Rotation::default()
        },
        ..file_sinks(&path)
    };
    write_with(&sinks, 30);
    // Restart after rotations: continues from the live file.
    write_with(&sinks, 30);
    let set = rotated_set(&path).unwrap();
    assert!(set.len() >= 4, "{set:?}");
    let mut all = Vec::new();
    for f in &set {
        assert!(fs::metadata(f).unwrap().len() <= 4000, "{f:?} too big");
        let recs = records(f);
        assert!(!recs.is_empty());
        all.extend(recs);
    }
    assert_eq!(all.len(), 60);
    assert_contiguous(&all, 1);
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 60);
    assert_eq!(report.files, set);
}

#[test]
fn retention_keeps_n_files_and_verify_accepts_a_later_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sinks = Sinks {
        rotation: Rotation {
            max_bytes: Some(3000),
            keep: Some(2),
            ..Rotation::default()
        },
        ..file_sinks(&path)
    };
    write_with(&sinks, 60);
    let set = rotated_set(&path).unwrap();
    assert_eq!(
        set,
        vec![numbered(&path, 2), numbered(&path, 1), path.clone()]
    );
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
    assert!(report.first_seq.unwrap() > 1);
    assert_eq!(report.last_seq, Some(60));
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("the chain starts at seq")),
        "{:?}",
        report.notes
    );
}

#[test]
fn age_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sinks = Sinks {
        rotation: Rotation {
            max_age: Some(Duration::from_millis(100)),
            ..Rotation::default()
        },
        ..file_sinks(&path)
    };
    let (auditor, handle) = Auditor::start(&sinks).unwrap();
    auditor.record(sample(0));
    auditor.record(sample(1));
    wait_until("first records written", || {
        auditor.metrics().records_written == 2
    });
    thread::sleep(Duration::from_millis(150));
    auditor.record(sample(2));
    drop(auditor);
    handle.join().unwrap();
    assert_eq!(records(&numbered(&path, 1)).len(), 2);
    assert_eq!(records(&path).len(), 1);
    assert!(check(std::slice::from_ref(&path)).ok());
    // After a restart, the age comes from the live file's first record.
    thread::sleep(Duration::from_millis(150));
    write_with(&sinks, 1);
    assert_eq!(records(&numbered(&path, 1)).len(), 1);
    assert_eq!(records(&numbered(&path, 2)).len(), 2);
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 4);
}

#[test]
fn continues_from_the_rotated_file_when_the_live_one_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_with(&file_sinks(&path), 3);
    // A crash right after the rename of a rotation.
    fs::rename(&path, numbered(&path, 1)).unwrap();
    write_with(&file_sinks(&path), 2);
    let recs = records(&path);
    assert_eq!(recs[0].seq, 4);
    assert!(check(std::slice::from_ref(&path)).ok());
}

// ---------------------------------------------------------------- crash recovery

#[test]
fn torn_last_line_is_cut_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_with(&file_sinks(&path), 5);
    let good_len = fs::metadata(&path).unwrap().len();
    let torn = br#"{"seq":6,"ts":"2026-11-22T10:00:00.123456Z","host":"we"#;
    append(&path, torn);
    // verify sees the torn line before the restart.
    let before = check(std::slice::from_ref(&path));
    let d = before.damage.clone().unwrap();
    assert_eq!((d.kind, d.line, d.seq), (DamageKind::Truncated, 6, Some(6)));

    write_with(&file_sinks(&path), 2);
    let recs = records(&path);
    assert_eq!(recs.len(), 8);
    assert_contiguous(&recs, 1);
    let rec = &recs[5];
    assert_eq!(rec.seq, 6);
    assert_eq!(rec.proto, "audit");
    assert_eq!(rec.decision, Decision::Error);
    assert_eq!(rec.origin, Some(Fault::Agent));
    assert_eq!(rec.reason.as_deref(), Some("recovered_truncation"));
    assert_eq!(rec.truncated_bytes, Some(torn.len() as u64));
    assert!(fs::metadata(&path).unwrap().len() > good_len);
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("recovered_truncation")),
        "{:?}",
        report.notes
    );
}

#[test]
fn garbage_last_line_counts_as_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_with(&file_sinks(&path), 3);
    append(&path, b"\0\0\0\0garbage\n\0\0");
    write_with(&file_sinks(&path), 1);
    let recs = records(&path);
    assert_eq!(recs.len(), 5);
    assert_eq!(recs[3].truncated_bytes, Some(14));
    assert!(check(&[path]).ok());
}

#[test]
fn a_tampered_last_record_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_with(&file_sinks(&path), 3);
    let mut lines = raw_lines(&path);
    lines[2] = lines[2].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
    write_lines(&path, &lines);
    let before = fs::read(&path).unwrap();
    let err = Auditor::start(&file_sinks(&path)).unwrap_err();
    assert!(matches!(err, AuditError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("seq 3"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), before, "evidence untouched");
}

#[test]
fn an_unchained_file_from_an_older_version_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    fs::write(&path, "{\"seq\":1,\"decision\":\"allow\"}\n").unwrap();
    write_with(&file_sinks(&path), 2);
    let recs = records(&path);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].seq, 1);
    let aside: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("audit.jsonl.unchained-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(check(&[path]).ok());
}

// ---------------------------------------------------------------- failing sinks

fn flaky_start(path: &Path, fsync: Fsync, faults: &Faults) -> (Auditor, thread::JoinHandle<()>) {
    let sinks = Sinks {
        fsync,
        ..file_sinks(path)
    };
    Auditor::start_with(&sinks, faults.opener(), Box::new(io::sink())).unwrap()
}

#[test]
fn failing_writes_make_it_unhealthy_then_it_recovers_without_loss() {
    for mode in [1u8, 2] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let faults = Faults::default();
        let (auditor, handle) = flaky_start(&path, Fsync::default(), &faults);
        for i in 0..100 {
            auditor.record(sample(i));
        }
        wait_until("first batch", || auditor.metrics().records_written == 100);
        assert!(auditor.healthy());
        faults.set_write(mode);
        for i in 100..300 {
            auditor.record(sample(i));
        }
        wait_until("unhealthy", || !auditor.healthy());
        let m = auditor.metrics();
        assert!(m.unhealthy && m.write_errors > 0, "{m:?}");
        assert!(m.queue_depth > 0, "{m:?}");
        // Keep failing across several retries; nothing half-written stays in the file.
        thread::sleep(Duration::from_millis(500));
        assert!(!auditor.healthy());
        assert!(auditor.metrics().write_errors >= 2);
        assert_eq!(records(&path).len(), 100, "mode {mode}");
        assert!(check(std::slice::from_ref(&path)).ok(), "mode {mode}");
        faults.set_write(0);
        wait_until("healthy again", || auditor.healthy());
        wait_until("backlog written", || auditor.metrics().queue_depth == 0);
        for i in 300..310 {
            auditor.record(sample(i));
        }
        drop(auditor);
        handle.join().unwrap();
        let recs = records(&path);
        assert_eq!(recs.len(), 310, "mode {mode}");
        assert_eq!(raw_lines(&path).len(), 310);
        assert_contiguous(&recs, 1);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.request_id.as_deref(), Some(format!("req-{i}").as_str()));
        }
        assert!(check(&[path]).ok());
    }
}

/// Write before respond: `Written` resolves only once the record is in the file, and
/// while the sink fails it stays pending (the response is held), then resolves with the
/// backlog.
#[test]
fn written_resolves_only_once_the_record_is_in_the_file() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let faults = Faults::default();
    let (auditor, handle) = flaky_start(&path, Fsync::default(), &faults);
    let in_file = |id: &str| {
        records(&path)
            .iter()
            .any(|r| r.request_id.as_deref() == Some(id))
    };
    // Healthy: every resolved record is already in the file.
    for i in 0..200 {
        let written =
            auditor
                .guard(sample(i))
                .finish_written(Decision::Allow, Some(200), None, None);
        rt.block_on(written.wait()).unwrap();
        assert!(
            in_file(&format!("req-{i}")),
            "record {i} acknowledged before written"
        );
    }
    // Failing sink: the acknowledgement waits for the recovery.
    faults.set_write(1);
    let mut written = auditor.guard(sample(200)).finish_written(
        Decision::Deny,
        Some(403),
        Some("no_rule"),
        Some(Fault::Policy),
    );
    wait_until("unhealthy", || !auditor.healthy());
    let pending =
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(600), &mut written).await });
    assert!(
        pending.is_err(),
        "acknowledged while the sink could not write"
    );
    assert!(!in_file("req-200"));
    faults.set_write(0);
    rt.block_on(written.wait()).unwrap();
    assert!(in_file("req-200"));
    drop(auditor);
    handle.join().unwrap();
    assert_contiguous(&records(&path), 1);
}

/// Record before forward: `record_decision` gives the proof only once the decision record
/// is in the file; its outcome is a second record linked by `outcome_of`, and the two fold
/// into one decision. While the sink fails, it is refused at once (no proof, so nothing
/// could be forwarded), and the decision with its 503 outcome is written once it recovers.
#[test]
fn a_decision_is_in_the_file_before_its_proof_and_refused_while_the_sink_fails() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let faults = Faults::default();
    let (auditor, handle) = flaky_start(&path, Fsync::default(), &faults);
    let find = |id: &str| -> Vec<StoredRecord> {
        records(&path)
            .into_iter()
            .filter(|r| r.request_id.as_deref() == Some(id))
            .collect()
    };
    for i in 0..50 {
        let mut guard = auditor.guard(sample(i));
        guard.record_mut().status = None;
        let (recorded, outcome) = rt
            .block_on(guard.record_decision(Decision::Allow, None, None))
            .unwrap();
        let id = format!("req-{i}");
        let decided = find(&id);
        assert_eq!(decided.len(), 1, "proof {i} before its record was written");
        assert_eq!(decided[0].seq, recorded.seq());
        assert!(decided[0].is_decision() && decided[0].status.is_none());
        rt.block_on(
            outcome
                .finish_written(Decision::Allow, Some(200), None, None)
                .wait(),
        )
        .unwrap();
        let both = find(&id);
        assert_eq!(both.len(), 2);
        assert_eq!(both[1].outcome_of, Some(recorded.seq()));
        assert!(!both[1].is_decision());
        assert_eq!(both[1].status, Some(200));
    }
    // Dropped unfinished (the client went away mid-request): an `aborted` outcome.
    let (recorded, outcome) = rt
        .block_on(
            auditor
                .guard(sample(50))
                .record_decision(Decision::Allow, None, None),
        )
        .unwrap();
    drop(outcome);
    faults.set_write(1);
    // Refused at once while the sink fails: the request gets a 503, nothing is forwarded.
    let mut refused = 0;
    for i in 51..60 {
        let result = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                auditor
                    .guard(sample(i))
                    .record_decision(Decision::Allow, None, None),
            )
            .await
        });
        match result.expect("record_decision waited for the failing sink to recover") {
            Ok(_) => assert!(auditor.healthy(), "proof {i} while the sink failed"),
            Err(outcome) => {
                refused += 1;
                outcome.finish_unavailable();
            }
        }
    }
    assert!(refused >= 8, "only {refused} refused");
    assert!(find("req-55").is_empty());
    faults.set_write(0);
    wait_until("backlog written", || {
        auditor.healthy() && auditor.metrics().queue_depth == 0
    });
    drop(auditor);
    handle.join().unwrap();
    let all = records(&path);
    assert_contiguous(&all, 1);
    let aborted: Vec<_> = all
        .iter()
        .filter(|r| r.request_id.as_deref() == Some("req-50"))
        .collect();
    assert_eq!(aborted.len(), 2);
    assert_eq!(aborted[1].outcome_of, Some(recorded.seq()));
    assert_eq!(aborted[1].reason.as_deref(), Some("aborted"));
    let unavailable = find("req-55");
    assert_eq!(unavailable.len(), 2, "{unavailable:?}");
    assert_eq!(unavailable[0].decision, Decision::Allow);
    assert_eq!(unavailable[1].outcome_of, Some(unavailable[0].seq));
    assert_eq!(unavailable[1].reason.as_deref(), Some(AUDIT_UNAVAILABLE));
    assert_eq!(unavailable[1].status, Some(503));
    // Folded: one value per decision, each with its outcome.
    let folded = query::fold_outcomes(json_lines(&path));
    assert_eq!(folded.len(), 60);
    assert!(
        folded
            .iter()
            .all(|d| d["outcome"]["outcome_of"] == d["seq"])
    );
    assert_eq!(folded[3]["status"], 200);
    assert!(check(&[path]).ok());
}

/// Folding keeps what does not link as values of their own, so counts show it.
#[test]
fn folding_outcomes_keeps_what_does_not_link() {
    let rec = |seq: u64, id: &str, of: Option<u64>| {
        let mut v = serde_json::json!({"seq": seq, "request_id": id, "status": null});
        if let Some(of) = of {
            v["outcome_of"] = of.into();
            v["status"] = 200.into();
        }
        v
    };
    let records = vec![
        rec(1, "a", None),
        rec(2, "b", None),
        rec(3, "a", Some(1)),
        // Second outcome of the same decision.
        rec(4, "a", Some(1)),
        // Links to a decision of another request.
        rec(5, "x", Some(2)),
        // Links to a decision not in the set (rotated away, cut) or to itself.
        rec(6, "c", Some(99)),
        rec(7, "d", Some(7)),
        // Links forward.
        rec(8, "e", Some(9)),
        rec(9, "e", None),
    ];
    let folded = query::fold_outcomes(records);
    let seqs: Vec<_> = folded.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 4, 5, 6, 7, 8, 9]);
    assert_eq!(folded[0]["status"], 200);
    assert_eq!(folded[0]["outcome"]["seq"], 3);
    assert!(folded[1].get("outcome").is_none());
    assert!(folded[7].get("outcome").is_none());
    // Values that are not objects or lack fields pass through.
    let odd = query::fold_outcomes(vec![
        serde_json::json!(3),
        serde_json::json!({"outcome_of": "x"}),
    ]);
    assert_eq!(odd.len(), 2);
}

#[test]
fn failing_fsync_rewrites_what_may_have_been_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let faults = Faults::default();
    let (auditor, handle) = flaky_start(&path, Fsync::EveryRecord, &faults);
    for i in 0..10 {
        auditor.record(sample(i));
    }
    wait_until("first batch", || auditor.metrics().records_written == 10);
    faults.set_sync(true);
    for i in 10..20 {
        auditor.record(sample(i));
    }
    wait_until("unhealthy", || !auditor.healthy());
    thread::sleep(Duration::from_millis(300));
    // The unsynced records were cut off again.
    assert_eq!(records(&path).len(), 10);
    faults.set_sync(false);
    wait_until("healthy again", || auditor.healthy());
    drop(auditor);
    handle.join().unwrap();
    let recs = records(&path);
    assert_eq!(recs.len(), 20);
    assert_contiguous(&recs, 1);
}

#[test]
fn full_backlog_applies_backpressure_and_summarises_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let faults = Faults::default();
    faults.set_write(1);
    let (auditor, handle) = flaky_start(&path, Fsync::default(), &faults);
    let total = BACKLOG_MAX + QUEUE;
    let a = auditor.clone();
    let producer = thread::spawn(move || {
        for i in 0..total {
            a.record(sample(i));
        }
    });
    wait_until("backlog and queue full", || {
        auditor.metrics().queue_depth == total as u64
    });
    assert!(!auditor.healthy());
    // The queue is full: refusals do not block, they are counted.
    let started = Instant::now();
    for _ in 0..5 {
        auditor.guard(Record::new("http")).finish_unavailable();
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    producer.join().unwrap();
    faults.set_write(0);
    wait_until("healthy again", || auditor.healthy());
    wait_until("all written", || auditor.metrics().queue_depth == 0);
    let m = auditor.metrics();
    assert_eq!(m.unavailable_summarised, 5, "{m:?}");
    drop(auditor);
    handle.join().unwrap();
    let recs = records(&path);
    assert_eq!(recs.len(), total + 1);
    assert_contiguous(&recs, 1);
    let summary: Vec<_> = recs.iter().filter(|r| r.count.is_some()).collect();
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].count, Some(5));
    assert_eq!(summary[0].status, Some(503));
    assert_eq!(summary[0].reason.as_deref(), Some("audit_unavailable"));
}

// ---------------------------------------------------------------- checkpoints

fn signed_sinks(path: &Path, key: &Path, every: u64) -> Sinks {
    Sinks {
        signing_key: Some(key.to_path_buf()),
        checkpoints: CheckpointPolicy {
            every_records: Some(every),
            interval: None,
        },
        ..file_sinks(path)
    }
}

#[test]
fn checkpoints_are_signed_chained_and_anchored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let key = dir.path().join("audit.key");
    write_with(&signed_sinks(&path, &key, 10), 35);
    let recs = records(&path);
    let cps: Vec<_> = recs.iter().filter(|r| r.checkpoint.is_some()).collect();
    // At least every 10 records, plus one at shutdown.
    assert!(cps.len() >= 4, "{}", cps.len());
    assert!(
        recs.last().unwrap().checkpoint.is_some(),
        "final checkpoint"
    );
    for c in &cps {
        let cp = c.checkpoint.as_ref().unwrap();
        assert_eq!(cp.seq + 1, c.seq);
        assert_eq!(cp.hash, c.prev.to_hex());
        assert_eq!(c.proto, "audit");
    }
    let anchor = fs::read_to_string(sink::with_suffix(&path, ".anchor")).unwrap();
    assert_eq!(anchor, raw_lines(&path).last().unwrap().clone());

    let pubkey = checkpoint::load_verifying_key(&checkpoint::public_key_path(&key)).unwrap();
    let report = verify(&VerifyOptions {
        files: vec![path.clone()],
        pubkey: Some(pubkey),
        ..VerifyOptions::default()
    })
    .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.checkpoints_verified, cps.len() as u64);

    // Another key: bad_signature at the first checkpoint.
    let stranger = checkpoint::generate().verifying_key();
    let report = verify(&VerifyOptions {
        files: vec![path.clone()],
        pubkey: Some(stranger),
        ..VerifyOptions::default()
    })
    .unwrap();
    let d = report.damage.unwrap();
    assert_eq!(d.kind, DamageKind::BadSignature);
    assert_eq!(d.seq, Some(cps[0].seq));
}

// ---------------------------------------------------------------- tampering

/// A 20-record chain in `dir/audit.jsonl` (no checkpoints).
fn chain20(dir: &Path) -> (PathBuf, Vec<String>) {
    let path = dir.join("audit.jsonl");
    write_with(&file_sinks(&path), 20);
    let lines = raw_lines(&path);
    assert_eq!(lines.len(), 20);
    (path, lines)
}

fn damage_of(files: &[PathBuf]) -> verify::Damage {
    let report = check(files);
    match report.damage {
        Some(d) => d,
        None => panic!("not detected: {report:?}"),
    }
}

#[test]
fn tamper_flip_one_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (path, lines) = chain20(dir.path());
    for (at, what) in [(40, "content"), (lines[6].len() - 10, "hash")] {
        let mut bytes = fs::read(&path).unwrap();
        let offset: usize = lines[..6].iter().map(String::len).sum::<usize>() + at;
        bytes[offset] ^= 0x01;
        let copy = dir.path().join(format!("flip-{what}.jsonl"));
        fs::write(&copy, bytes).unwrap();
        let d = damage_of(std::slice::from_ref(&copy));
        assert_eq!(d.kind, DamageKind::Edited, "{what}: {d:?}");
        assert_eq!((d.file.clone(), d.line), (copy.clone(), 7), "{what}: {d:?}");
        assert_eq!(d.expected_seq, 7);
    }
}

#[test]
fn tamper_edit_and_rehash_is_caught_at_the_next_link() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut lines) = chain20(dir.path());
    // Rewrite record 7 with a new, self-consistent hash.
    let mut rec: serde_json::Value = serde_json::from_str(&lines[6]).unwrap();
    rec["decision"] = "allow".into();
    rec["reason"] = serde_json::Value::Null;
    let parsed: StoredRecord = serde_json::from_value(rec).unwrap();
    let mut r = Record::new("http");
    r.ts = parsed.ts.clone();
    r.host = parsed.host.clone();
    r.decision = parsed.decision;
    let mut out = Vec::new();
    chain::seal(&mut r, 7, &parsed.prev, &mut out);
    lines[6] = String::from_utf8(out).unwrap();
    write_lines(&path, &lines);
    let d = damage_of(std::slice::from_ref(&path));
    assert_eq!(
        (d.kind, d.line, d.seq),
        (DamageKind::Edited, 8, Some(8)),
        "{d:?}"
    );
}

#[test]
fn tamper_delete_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut lines) = chain20(dir.path());
    lines.remove(6);
    write_lines(&path, &lines);
    let d = damage_of(std::slice::from_ref(&path));
    assert_eq!(
        (d.kind, d.line, d.seq),
        (DamageKind::Deleted, 7, Some(8)),
        "{d:?}"
    );
    assert!(d.detail.contains("seq 7 is missing"), "{}", d.detail);
}

#[test]
fn tamper_swap_two_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut lines) = chain20(dir.path());
    lines.swap(6, 7);
    write_lines(&path, &lines);
    let d = damage_of(std::slice::from_ref(&path));
    assert_eq!(
        (d.kind, d.line, d.seq),
        (DamageKind::Reordered, 7, Some(8)),
        "{d:?}"
    );
    // Swapping distant lines too.
    let (path, mut lines) = chain20(&dir.path().join("x").tap_mkdir());
    lines.swap(3, 15);
    write_lines(&path, &lines);
    let d = damage_of(std::slice::from_ref(&path));
    assert_eq!((d.kind, d.line), (DamageKind::Reordered, 4), "{d:?}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn tamper_truncate_mid_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = chain20(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let d = damage_of(std::slice::from_ref(&path));
    assert_eq!(
        (d.kind, d.line, d.seq),
        (DamageKind::Truncated, 20, Some(20)),
        "{d:?}"
    );
}

#[test]
fn tamper_remove_the_whole_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let key = dir.path().join("audit.key");
    write_with(&signed_sinks(&path, &key, 1000), 20);
    let lines = raw_lines(&path);
    assert_eq!(lines.len(), 21, "20 records + the final checkpoint");
    // Without an anchor, tail removal is invisible: verify says so.
    let copy = dir.path().join("copy.jsonl");
    write_lines(&copy, &lines[..15]);
    let report = check(std::slice::from_ref(&copy));
    assert!(report.ok());
    assert!(
        report.notes.iter().any(|n| n.contains(
            "verified up to seq 15; tail truncation is detectable only against an anchor"
        )),
        "{:?}",
        report.notes
    );
    // With the anchor next to the file (and with --anchor), it is detected.
    write_lines(&path, &lines[..15]);
    let d = damage_of(std::slice::from_ref(&path));
    assert_eq!((d.kind, d.line), (DamageKind::Truncated, 16), "{d:?}");
    assert!(
        d.detail.contains("records 16..=21 were removed"),
        "{}",
        d.detail
    );
    let pubkey = checkpoint::load_verifying_key(&key).unwrap();
    let report = verify(&VerifyOptions {
        files: vec![copy.clone()],
        pubkey: Some(pubkey),
        anchors: vec![sink::with_suffix(&path, ".anchor")],
    })
    .unwrap();
    assert_eq!(report.damage.unwrap().kind, DamageKind::Truncated);
    // Removing only the checkpoint line is caught too.
    write_lines(&path, &lines[..20]);
    let d = damage_of(std::slice::from_ref(&path));
    assert_eq!((d.kind, d.line), (DamageKind::Truncated, 21), "{d:?}");
}

#[test]
fn tamper_splice_two_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a").tap_mkdir().join("audit.jsonl");
    let b = dir.path().join("b").tap_mkdir().join("audit.jsonl");
    write_with(&file_sinks(&a), 10);
    write_with(&file_sinks(&b), 10);
    let d = damage_of(&[a.clone(), b.clone()]);
    assert_eq!(
        (d.kind, d.file.clone(), d.line, d.seq),
        (DamageKind::Spliced, b.clone(), 1, Some(1)),
        "{d:?}"
    );
    // A chain continued on another host with the right seq still does not link.
    let c = dir.path().join("c").tap_mkdir().join("audit.jsonl");
    write_with(&file_sinks(&c), 20);
    let tail = dir.path().join("tail.jsonl");
    write_lines(&tail, &raw_lines(&c)[10..]);
    let d = damage_of(&[a, tail.clone()]);
    assert_eq!(
        (d.kind, &d.file, d.line),
        (DamageKind::Spliced, &tail, 1),
        "{d:?}"
    );
}

#[test]
fn tamper_missing_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sinks = Sinks {
        rotation: Rotation {
            max_bytes: Some(3000),
            ..Rotation::default()
        },
        ..file_sinks(&path)
    };
    write_with(&sinks, 40);
    let set = rotated_set(&path).unwrap();
    assert!(set.len() >= 3);
    let mut files = set.clone();
    files.remove(1);
    let d = damage_of(&files);
    assert_eq!(d.kind, DamageKind::Deleted, "{d:?}");
    assert_eq!(d.file, files[1]);
}

// ---------------------------------------------------------------- schema

/// Checks `value` against the subset of JSON Schema used by record.schema.json.
fn validate(schema: &serde_json::Value, value: &serde_json::Value, at: &str) {
    use serde_json::Value;
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
            _ => panic!("bad type in schema at {at}"),
        };
        let ok = types.iter().any(|t| match *t {
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "null" => value.is_null(),
            "object" => value.is_object(),
            "boolean" => value.is_boolean(),
            "array" => value.is_array(),
            other => panic!("type {other} not supported by the test"),
        });
        assert!(ok, "{at}: {value} is not of type {types:?}");
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        assert!(values.contains(value), "{at}: {value} not in {values:?}");
    }
    if let (Some(pattern), Some(s)) = (
        schema.get("pattern").and_then(Value::as_str),
        value.as_str(),
    ) {
        assert!(
            regex::Regex::new(pattern).unwrap().is_match(s),
            "{at}: {s} !~ {pattern}"
        );
    }
    if let (Some(items), Some(a)) = (schema.get("items"), value.as_array()) {
        for (i, v) in a.iter().enumerate() {
            validate(items, v, &format!("{at}[{i}]"));
        }
    }
    if let Some(n) = value.as_u64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_u64) {
            assert!(n >= min, "{at}: {n} < {min}");
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_u64) {
            assert!(n <= max, "{at}: {n} > {max}");
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = req.as_str().unwrap();
            assert!(obj.contains_key(req), "{at}: missing required {req}");
        }
        for (k, v) in obj {
            let sub = props.and_then(|p| p.get(k));
            match sub {
                Some(sub) => validate(sub, v, &format!("{at}.{k}")),
                None => assert!(
                    schema.get("additionalProperties") != Some(&Value::Bool(false)),
                    "{at}: unexpected key {k}"
                ),
            }
        }
    }
}

#[test]
fn real_records_match_the_schema() {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("record.schema.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let key = dir.path().join("audit.key");
    write_with(&signed_sinks(&path, &key, 3), 4);
    // A torn tail, recovered at the next start.
    append(&path, b"{\"seq\":");
    let (auditor, handle) = Auditor::start(&signed_sinks(&path, &key, 3)).unwrap();
    let mut full = sample(1);
    full.exe = Some("/usr/bin/curl".into());
    full.bytes_up = Some(312);
    full.bytes_down = Some(1048);
    full.latency_us = Some(840);
    full.origin = Some(Fault::Policy);
    // An IPv4-mapped private address: classified by the embedded IPv4.
    let full = full.with_dst_addr("[::ffff:10.0.0.1]:443".parse().unwrap());
    assert_eq!(full.dst.class.as_deref(), Some("private"));
    auditor.record(full);
    auditor.record(Record::new("tcp"));
    auditor.guard(Record::new("http")).finish_unavailable();
    drop(auditor);
    handle.join().unwrap();
    let values = json_lines(&path);
    let mut seen = std::collections::HashSet::new();
    for (i, v) in values.iter().enumerate() {
        validate(&schema, v, &format!("line {}", i + 1));
        if v.get("checkpoint").is_some() {
            seen.insert("checkpoint");
        }
        if v.get("truncated_bytes").is_some() {
            seen.insert("recovered");
        }
        if v["exe"].is_string() {
            seen.insert("exe");
        }
        if v["dst"].get("class").is_some() {
            seen.insert("class");
        }
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    // A summary record validates too.
    let mut summary = Record::new("audit");
    summary.decision = Decision::Deny;
    summary.status = Some(503);
    summary.count = Some(3);
    let mut out = Vec::new();
    chain::seal(&mut summary, 1, &chain::GENESIS, &mut out);
    validate(&schema, &serde_json::from_slice(&out).unwrap(), "summary");
    // Lifecycle records validate too.
    let mut started = lifecycle::agent_started(Some("ab".repeat(32)));
    started.clean = Some(false);
    for (i, mut r) in [
        started,
        lifecycle::agent_stopping("SIGTERM"),
        lifecycle::policy_reloaded(Some("cd".repeat(32)), "SIGHUP"),
        lifecycle::policy_rejected(None, "SIGHUP", &["a.yaml:1:2: bad"]),
        lifecycle::clock_step(-3_600_000_000, jiff::Timestamp::now()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut out = Vec::new();
        chain::seal(&mut r, 1, &chain::GENESIS, &mut out);
        validate(
            &schema,
            &serde_json::from_slice(&out).unwrap(),
            &format!("lifecycle {i}"),
        );
    }
}

// ---------------------------------------------------------------- command line

fn cli(command: AuditCommand) -> (bool, String) {
    let mut out = Vec::new();
    let ok = run_to(command, &mut out, false).unwrap();
    (ok, String::from_utf8(out).unwrap())
}

#[test]
fn cli_verify_prints_ok_or_the_first_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let key = dir.path().join("audit.key");
    write_with(&signed_sinks(&path, &key, 10), 25);
    let (ok, out) = cli(AuditCommand::Verify {
        files: vec![path.clone()],
        pubkey: Some(checkpoint::public_key_path(&key)),
        anchor: vec![],
    });
    assert!(ok, "{out}");
    assert!(
        out.starts_with("OK: 28 records, seq 1..28, 3 checkpoints verified\n"),
        "{out}"
    );
    let mut lines = raw_lines(&path);
    lines.remove(4);
    write_lines(&path, &lines);
    let (ok, out) = cli(AuditCommand::Verify {
        files: vec![path.clone()],
        pubkey: None,
        anchor: vec![],
    });
    assert!(!ok);
    let first = out.lines().next().unwrap();
    assert_eq!(
        first,
        format!(
            "FAIL: deleted: {}:5 seq 6: seq 5 is missing",
            path.display()
        )
    );
    assert!(
        out.contains("verified before the damage: 4 records, seq 1..4"),
        "{out}"
    );
}

#[test]
fn cli_query_filters_and_spans_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sinks = Sinks {
        rotation: Rotation {
            max_bytes: Some(3000),
            ..Rotation::default()
        },
        ..file_sinks(&path)
    };
    write_with(&sinks, 30);
    assert!(rotated_set(&path).unwrap().len() > 2);
    let query = |workload: Option<&str>, decision, json| AuditCommand::Query {
        files: vec![path.clone()],
        workload: workload.map(str::to_owned),
        decision,
        since: Some("1h".into()),
        until: None,
        dst: Some("api.example.com:443".into()),
        rule: None,
        json,
    };
    // billing: i.is_multiple_of(3) → 10 records; deny: odd i → 5 of them.
    let (_, out) = cli(query(Some("billing"), Some(Decision::Deny), true));
    let got: Vec<StoredRecord> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|r| r.decision == Decision::Deny));
    assert!(
        got.windows(2).all(|w| w[0].seq < w[1].seq),
        "in chain order"
    );
    let (_, table) = cli(query(Some("billing"), None, false));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 11, "{table}");
    assert!(rows[0].contains("DECISION"));
    let (_, none) = cli(AuditCommand::Query {
        files: vec![path.clone()],
        workload: None,
        decision: None,
        since: None,
        until: Some("1h".into()),
        dst: None,
        rule: Some("create-charge".into()),
        json: true,
    });
    assert!(none.is_empty(), "{none}");
    let (_, by_rule) = cli(AuditCommand::Query {
        files: vec![path.clone()],
        workload: None,
        decision: None,
        since: None,
        until: None,
        dst: Some("192.0.2.7".into()),
        rule: Some("create-charge".into()),
        json: true,
    });
    assert_eq!(by_rule.lines().count(), 15);
}

#[test]
fn cli_tail_last_lines_and_follow_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_with(&file_sinks(&path), 20);
    let (_, out) = cli(AuditCommand::Tail {
        file: Some(path.clone()),
        follow: false,
        lines: 3,
        workload: None,
        decision: Some(Decision::Allow),
    });
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 4, "{out}");
    assert!(rows[3].trim_start().starts_with("19 "), "{out}");

    // Follow: new records, then a rotation.
    let sinks = Sinks {
        rotation: Rotation {
            max_bytes: Some(fs::metadata(&path).unwrap().len() + 1500),
            ..Rotation::default()
        },
        ..file_sinks(&path)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let out = SharedBuf::default();
    let follower = {
        let stop = stop.clone();
        let mut out = out.clone();
        let path = path.clone();
        thread::spawn(move || {
            query::tail(
                &query::TailSource::File(path),
                0,
                &query::Filter::default(),
                true,
                false,
                &mut out,
                &move || stop.load(std::sync::atomic::Ordering::SeqCst),
            )
            .unwrap();
        })
    };
    thread::sleep(Duration::from_millis(300));
    write_with(&sinks, 10);
    assert!(numbered(&path, 1).exists(), "rotated");
    let text = || String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    wait_until("followed records", || text().lines().count() >= 11);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    follower.join().unwrap();
    let seqs: Vec<u64> = text()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, (21..=30).collect::<Vec<_>>());
}

#[test]
fn cli_keygen_writes_a_usable_pair() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let (ok, out) = cli(AuditCommand::Keygen { out: key.clone() });
    assert!(ok, "{out}");
    let signing = checkpoint::load_or_generate(&key).unwrap();
    let public = checkpoint::load_verifying_key(&checkpoint::public_key_path(&key)).unwrap();
    assert_eq!(signing.verifying_key(), public);
    // Never overwrites.
    let mut sink = Vec::new();
    assert!(run_to(AuditCommand::Keygen { out: key }, &mut sink, false).is_err());
}

// ---------------------------------------------------------------- lifecycle records

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

/// One run of the agent as `run.rs` drives it: `agent_started`, `n` samples, then a clean
/// stop (`agent_stopping`, awaited) or a crash-like exit without one.
fn agent_run(sinks: &Sinks, n: usize, clean_stop: bool) {
    let (auditor, handle) = Auditor::start(sinks).unwrap();
    auditor.record(lifecycle::agent_started(Some("00".repeat(32))));
    for i in 0..n {
        auditor.record(sample(i));
    }
    if clean_stop {
        block_on(auditor.stop("SIGTERM").wait()).unwrap();
    }
    drop(auditor);
    handle.join().unwrap();
}

fn with_reason<'a>(recs: &'a [StoredRecord], reason: &str) -> Vec<&'a StoredRecord> {
    recs.iter().filter(|r| r.is_audit(reason)).collect()
}

/// Each lifecycle record kind is written as an ordinary link of the chain.
#[test]
fn lifecycle_records_are_chained_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (auditor, handle) = Auditor::start(&file_sinks(&path)).unwrap();
    auditor.record(lifecycle::agent_started(Some("11".repeat(32))));
    auditor.record(sample(0));
    auditor.record(lifecycle::policy_reloaded(Some("22".repeat(32)), "SIGHUP"));
    auditor.record(lifecycle::policy_rejected(
        Some("33".repeat(32)),
        "policy directory changed",
        &["a.yaml:3:7: unknown field `bogus`"],
    ));
    auditor.record(sample(1));
    block_on(auditor.stop("SIGINT").wait()).unwrap();
    drop(auditor);
    handle.join().unwrap();

    let recs = records(&path);
    assert_contiguous(&recs, 1);
    let reasons: Vec<_> = recs
        .iter()
        .map(|r| r.reason.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        reasons,
        [
            "agent_started",
            "",
            "policy_reloaded",
            "policy_rejected",
            "path_not_allowed",
            "agent_stopping"
        ],
        "{reasons:?}"
    );
    let started = &recs[0];
    assert_eq!(
        (started.proto.as_str(), started.decision, started.origin),
        ("audit", Decision::Allow, Some(Fault::Agent))
    );
    assert_eq!(started.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(started.policy_hash, Some("11".repeat(32)));
    assert_eq!(started.clean, None, "a new chain has no previous run");
    let reloaded = &recs[2];
    assert_eq!(reloaded.decision, Decision::Allow);
    assert_eq!(reloaded.policy_hash, Some("22".repeat(32)));
    assert_eq!(reloaded.trigger.as_deref(), Some("SIGHUP"));
    let rejected = &recs[3];
    assert_eq!(
        (rejected.decision, rejected.origin),
        (Decision::Error, Some(Fault::Policy))
    );
    assert_eq!(
        rejected.errors.as_deref(),
        Some(&["a.yaml:3:7: unknown field `bogus`".to_string()][..])
    );
    let stopping = &recs[5];
    assert_eq!(stopping.decision, Decision::Allow);
    assert_eq!(stopping.trigger.as_deref(), Some("SIGINT"));
    // Only these records carry the new fields.
    assert!(recs[1].version.is_none() && recs[1].policy_hash.is_none());
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 6);
}

/// A clean stop anchors its `agent_stopping` record even without a signing key, so that
/// cutting records off the end is detected, with the first missing seq named.
#[test]
fn clean_stop_anchors_without_a_key_and_a_cut_tail_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    agent_run(&file_sinks(&path), 8, true);
    let lines = raw_lines(&path);
    assert_eq!(lines.len(), 10, "agent_started + 8 + agent_stopping");
    let anchor = sink::with_suffix(&path, ".anchor");
    let anchored = fs::read_to_string(&anchor).unwrap();
    assert_eq!(
        &anchored,
        lines.last().unwrap(),
        "the anchor is the agent_stopping line"
    );
    assert!(anchored.contains("\"reason\":\"agent_stopping\""));
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.anchor.as_ref().map(|a| a.1), Some(10));
    assert!(
        report.notes.iter().any(|n| n.contains("unsigned anchor")),
        "{:?}",
        report.notes
    );
    // Cut the last N lines: truncated, naming the first missing seq.
    for n in [1usize, 3, 9] {
        write_lines(&path, &lines[..lines.len() - n]);
        let d = damage_of(std::slice::from_ref(&path));
        let first_missing = (lines.len() - n + 1) as u64;
        assert_eq!(d.kind, DamageKind::Truncated, "{d:?}");
        assert_eq!(d.expected_seq, first_missing, "{d:?}");
        assert!(
            d.detail
                .contains(&format!("records {first_missing}..=10 were removed")),
            "{}",
            d.detail
        );
    }
    // The same with the anchor given explicitly, against a copy elsewhere.
    let copy = dir.path().join("copy.jsonl");
    write_lines(&copy, &lines[..7]);
    let report = verify(&VerifyOptions {
        files: vec![copy],
        anchors: vec![anchor],
        ..VerifyOptions::default()
    })
    .unwrap();
    let d = report.damage.unwrap();
    assert_eq!(
        (d.kind, d.expected_seq),
        (DamageKind::Truncated, 8),
        "{d:?}"
    );
}

/// With a signing key, the stop is followed by a signed checkpoint, which is the anchor.
#[test]
fn clean_stop_with_a_key_checkpoints_and_anchors_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let key = dir.path().join("audit.key");
    agent_run(&signed_sinks(&path, &key, 1000), 4, true);
    let recs = records(&path);
    let n = recs.len();
    assert!(recs[n - 2].is_audit(lifecycle::AGENT_STOPPING), "{recs:?}");
    let cp = recs[n - 1].checkpoint.as_ref().expect("a final checkpoint");
    assert_eq!(cp.seq, recs[n - 2].seq);
    let lines = raw_lines(&path);
    let anchor = fs::read_to_string(sink::with_suffix(&path, ".anchor")).unwrap();
    assert_eq!(&anchor, lines.last().unwrap());
    let pubkey = checkpoint::load_verifying_key(&checkpoint::public_key_path(&key)).unwrap();
    let verify_with_key = || {
        verify(&VerifyOptions {
            files: vec![path.clone()],
            pubkey: Some(pubkey),
            ..VerifyOptions::default()
        })
        .unwrap()
    };
    assert!(verify_with_key().ok());
    write_lines(&path, &lines[..n - 2]);
    let d = verify_with_key().damage.unwrap();
    assert_eq!(
        (d.kind, d.expected_seq),
        (DamageKind::Truncated, (n - 1) as u64)
    );
}

/// The next start says whether the previous run ended with `agent_stopping`.
#[test]
fn next_start_says_whether_the_previous_run_stopped_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sinks = file_sinks(&path);
    let started = || -> Vec<Option<bool>> {
        with_reason(&records(&path), lifecycle::AGENT_STARTED)
            .iter()
            .map(|r| r.clean)
            .collect()
    };
    agent_run(&sinks, 3, false); // 1: new chain; ends without agent_stopping
    agent_run(&sinks, 3, true); // 2: previous unclean; stops cleanly
    agent_run(&sinks, 3, true); // 3: previous clean
    assert_eq!(started(), [None, Some(false), Some(true)]);
    // Records after agent_stopping (connections that ended late) do not make it unclean.
    let (auditor, handle) = Auditor::start(&sinks).unwrap();
    auditor.record(sample(9));
    drop(auditor);
    handle.join().unwrap();
    agent_run(&sinks, 1, true); // 4: previous clean; stops cleanly
    // A torn line after it (a crash while writing): unclean, whatever came before.
    append(&path, b"{\"seq\":99,\"ts\":");
    agent_run(&sinks, 1, true); // 5: previous unclean
    assert_eq!(
        started(),
        [None, Some(false), Some(true), Some(true), Some(false)]
    );
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
}

/// A torn tail is cut and `recovered_truncation` is in the file as soon as the writer is
/// open, before any other record: a second crash before any traffic keeps the evidence.
#[test]
fn torn_tail_is_recorded_at_open_before_any_other_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    agent_run(&file_sinks(&path), 3, false);
    let before = records(&path).len() as u64;
    append(&path, b"{\"seq\":6,\"ts\":\"2026");
    let (auditor, handle) = Auditor::start(&file_sinks(&path)).unwrap();
    // Nothing recorded yet: read the file as a second crash would leave it.
    let recs = records(&path);
    assert_eq!(recs.len() as u64, before + 1);
    let last = recs.last().unwrap();
    assert!(last.is_recovered_truncation(), "{last:?}");
    assert_eq!(last.seq, before + 1);
    assert_eq!(last.truncated_bytes, Some(19));
    assert!(check(std::slice::from_ref(&path)).ok());
    auditor.record(lifecycle::agent_started(None));
    drop(auditor);
    handle.join().unwrap();
    let recs = records(&path);
    assert!(recs[before as usize].is_recovered_truncation());
    assert!(recs[before as usize + 1].is_audit(lifecycle::AGENT_STARTED));
    assert_eq!(recs[before as usize + 1].clean, Some(false));
    assert_contiguous(&recs, 1);
}

/// A clock whose wall time the test sets.
#[derive(Debug)]
struct FakeClock(Mutex<(Duration, jiff::Timestamp)>);

impl lifecycle::Clock for FakeClock {
    fn monotonic(&self) -> Duration {
        self.0.lock().unwrap().0
    }

    fn wall(&self) -> jiff::Timestamp {
        self.0.lock().unwrap().1
    }
}

/// A wall-clock step between two records writes one `clock_step` record saying by how
/// much; `verify` reports it (and the backwards `ts`) as notes, not damage.
#[test]
fn clock_step_is_recorded_once_and_verify_notes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let now = jiff::Timestamp::now();
    let clock = Arc::new(FakeClock(Mutex::new((Duration::from_secs(100), now))));
    let (auditor, handle) = Auditor::start_with_clock(
        &file_sinks(&path),
        sink::default_opener(),
        Box::new(io::sink()),
        clock.clone(),
    )
    .unwrap();
    let wait_for = |n: usize| wait_until("records written", || records(&path).len() == n);
    auditor.record(sample(0));
    wait_for(1);
    // Both clocks advance 1 s together: no step. Then within the threshold: no step.
    *clock.0.lock().unwrap() = (Duration::from_secs(101), now + Duration::from_secs(1));
    auditor.record(sample(1));
    wait_for(2);
    *clock.0.lock().unwrap() = (Duration::from_secs(102), now + Duration::from_millis(3500));
    auditor.record(sample(2));
    wait_for(3);
    // The wall clock is set back an hour while 1 s passes.
    let stepped = now - Duration::from_secs(3600);
    *clock.0.lock().unwrap() = (Duration::from_secs(103), stepped);
    auditor.record(sample(3));
    wait_for(5);
    *clock.0.lock().unwrap() = (Duration::from_secs(104), stepped + Duration::from_secs(1));
    auditor.record(sample(4));
    drop(auditor);
    handle.join().unwrap();

    let recs = records(&path);
    assert_contiguous(&recs, 1);
    let steps = with_reason(&recs, lifecycle::CLOCK_STEP);
    assert_eq!(steps.len(), 1, "{recs:?}");
    let step = steps[0];
    assert_eq!(
        step.seq, 4,
        "just before the first record sealed after the step"
    );
    assert_eq!(step.decision, Decision::Error);
    // Wall: from now+3.5 s to now-3600 s; monotonic: +1 s.
    assert_eq!(step.clock_step_us, Some(-3_604_500_000));
    assert_eq!(step.ts, format!("{stepped:.6}"));
    let report = check(std::slice::from_ref(&path));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.clock_steps, 1);
    assert_eq!(report.ts_steps_back, 1, "{:?}", report.notes);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("clock_step") && n.contains("-3604.500 s")),
        "{:?}",
        report.notes
    );
    assert!(
        report.notes.iter().any(|n| n.contains("ts goes back")),
        "{:?}",
        report.notes
    );
}

/// A rejected policy is recorded with the loader's `file:line:col` errors.
#[test]
fn policy_rejected_carries_file_line_col() {
    let policies = tempfile::tempdir().unwrap();
    fs::write(policies.path().join("broken.yaml"), "workload: [unclosed\n").unwrap();
    let errors = crate::policy::Snapshot::load_dir(policies.path()).unwrap_err();
    let hash = lifecycle::policy_hash(policies.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (auditor, handle) = Auditor::start(&file_sinks(&path)).unwrap();
    auditor.record(lifecycle::policy_rejected(
        Some(hash.clone()),
        "SIGHUP",
        &errors.0,
    ));
    drop(auditor);
    handle.join().unwrap();
    let recs = records(&path);
    let r = &recs[0];
    assert!(r.is_audit(lifecycle::POLICY_REJECTED));
    assert_eq!(r.policy_hash.as_deref(), Some(hash.as_str()));
    let errs = r.errors.as_ref().unwrap();
    assert_eq!(errs.len(), errors.0.len());
    let re = regex::Regex::new(r"broken\.yaml:\d+:\d+: ").unwrap();
    assert!(re.is_match(&errs[0]), "{errs:?}");
    assert!(check(std::slice::from_ref(&path)).ok());
}

// ---------------------------------------------------------------- standard input

#[test]
fn verify_reads_standard_input_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut lines) = chain20(dir.path());
    let bytes = fs::read(&path).unwrap();
    let report = cli::verify_reader(&mut bytes.as_slice(), None, Vec::new()).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 20);
    assert_eq!(report.files, [PathBuf::from("<stdin>")]);
    // A deleted record is found and placed in `<stdin>`.
    lines.remove(6);
    let broken = lines.concat();
    let report = cli::verify_reader(&mut broken.as_bytes(), None, Vec::new()).unwrap();
    let d = report.damage.clone().unwrap();
    assert_eq!(
        (d.kind, d.file.clone(), d.line),
        (DamageKind::Deleted, PathBuf::from("<stdin>"), 7),
        "{d:?}"
    );
    let mut out = Vec::new();
    report.render(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("FAIL: deleted: <stdin>:7 "), "{text}");
    // Hostile input: not JSON, empty, a torn last line.
    for (input, kind) in [
        ("not json\n", Some(DamageKind::Edited)),
        ("", None),
        (&lines[0][..lines[0].len() - 5], Some(DamageKind::Truncated)),
    ] {
        let report = cli::verify_reader(&mut input.as_bytes(), None, Vec::new()).unwrap();
        assert_eq!(report.damage.map(|d| d.kind), kind, "{input:?}");
    }
    // `-` cannot be mixed with files.
    let e = run_to(
        AuditCommand::Verify {
            files: vec!["-".into(), path],
            pubkey: None,
            anchor: Vec::new(),
        },
        &mut Vec::new(),
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("cannot be combined"), "{e}");
}
