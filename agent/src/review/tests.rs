#![allow(clippy::unwrap_used, reason = "tests")]
use super::*;

const POLICY: &str = "\
workload: billing
select: {cgroup: /billing}
egress:
  - host: api.example.com
    port: 443
    rules:
      - {id: charge, methods: [POST], path: /v1/charges, expires: '2026-12-05T00:00:00Z'}
      - {id: read, methods: [GET], path: '/v1/customers/{id}'}
  - host: legacy.example.com
    port: 80
    rules:
      - {id: legacy, methods: [GET], path: /**}
";

fn snapshot() -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("billing.yaml"), POLICY).unwrap();
    Snapshot::load_dir(dir.path()).unwrap()
}

/// A stored record with the fields a review reads; the chain fields are dummies.
fn record(seq: u64, ts: &str, fields: serde_json::Value) -> StoredRecord {
    let mut base = serde_json::json!({
        "seq": seq, "ts": ts, "host": "h", "workload": "billing", "cgroup": "/billing",
        "pid": 7, "uid": 0, "exe": null,
        "dst": {"host": "api.example.com", "ip": "192.0.2.7", "port": 443},
        "proto": "http", "method": "GET", "path": "/v1/customers/12", "rule": null,
        "decision": "allow", "reason": null, "origin": null, "status": null,
        "bytes_up": null, "bytes_down": null, "latency_us": null, "request_id": "r",
        "prev": "0".repeat(64), "hash": "0".repeat(64)
    });
    for (k, v) in fields.as_object().unwrap() {
        base[k] = v.clone();
    }
    serde_json::from_value(base).unwrap()
}

fn period() -> Period {
    Period {
        since: None,
        until: None,
        now: "2026-12-01T12:00:00Z".parse().unwrap(),
        expiring_within: SignedDuration::from_hours(24 * 14),
        buckets: 4,
    }
}

fn trail() -> Vec<StoredRecord> {
    use serde_json::json;
    vec![
        record(1, "2026-12-01T10:00:00.000000Z", json!({"rule": "read"})),
        // The outcome record of the allow above: not a decision.
        record(
            2,
            "2026-12-01T10:00:00.000100Z",
            json!({"outcome_of": 1, "status": 200}),
        ),
        record(3, "2026-12-01T10:10:00.000000Z", json!({"rule": "read"})),
        record(
            4,
            "2026-12-01T10:20:00.000000Z",
            json!({"method": "DELETE", "decision": "deny", "reason": "method_not_allowed",
                   "nearest_rule": "read"}),
        ),
        record(
            5,
            "2026-12-01T10:30:00.000000Z",
            json!({"method": "DELETE", "decision": "deny", "reason": "method_not_allowed"}),
        ),
        record(
            6,
            "2026-12-01T10:40:00.000000Z",
            json!({"method": "GET", "path": "/<script>alert(1)</script>", "decision": "deny",
                   "reason": "path_not_allowed"}),
        ),
        // A kernel deny: connection-level.
        record(
            7,
            "2026-12-01T10:50:00.000000Z",
            json!({"proto": "tcp", "method": null, "path": null, "request_id": null,
                   "dst": {"host": null, "ip": "127.0.0.2", "port": 6379},
                   "decision": "deny", "reason": "port_not_allowed"}),
        ),
        // A workload the policy does not have.
        record(
            8,
            "2026-12-01T11:00:00.000000Z",
            json!({"workload": "payroll", "decision": "deny", "reason": "no_policy"}),
        ),
        // A lifecycle incident: not a decision of a workload.
        record(
            9,
            "2026-12-01T11:00:01.000000Z",
            json!({"proto": "audit", "workload": null, "method": null, "path": null,
                   "decision": "error", "reason": "enforcement_lost"}),
        ),
    ]
}

#[test]
fn counts_grants_denies_and_incidents() {
    let review = Review::build(&trail(), &snapshot(), &period());
    assert_eq!(
        review.totals,
        Counts {
            allow: 2,
            deny: 5,
            would_deny: 0,
            error: 0
        }
    );
    let billing = &review.workloads[0];
    assert_eq!(billing.name, "billing");
    assert_eq!(billing.mode.as_deref(), Some("enforce"));
    assert_eq!((billing.counts.allow, billing.counts.deny), (2, 4));
    let grants: Vec<(&str, u64, Option<&str>)> = billing
        .grants
        .iter()
        .map(|g| (g.rule.as_str(), g.allows, g.expires.as_deref()))
        .collect();
    assert_eq!(
        grants,
        [
            ("charge", 0, Some("2026-12-05T00:00:00Z")),
            ("read", 2, None),
            ("legacy", 0, None)
        ]
    );
    assert_eq!(review.workloads[1].name, "payroll");
    assert_eq!(review.workloads[1].mode, None);
    assert_eq!(review.top_denied[0].count, 2, "{:?}", review.top_denied);
    assert_eq!(review.top_denied[0].method, "DELETE");
    assert_eq!(review.top_denied.len(), 3);
    assert_eq!(review.connection_denies.len(), 1);
    assert_eq!(review.connection_denies[0].destination, "127.0.0.2:6379");
    assert_eq!(review.connection_denies[0].reason, "port_not_allowed");
    assert_eq!(review.unused.len(), 2, "{:?}", review.unused);
    assert!(
        review.unused[0].contains("rule charge"),
        "{:?}",
        review.unused
    );
    assert!(review.unused[1].contains("destination legacy.example.com:80"));
    assert_eq!(review.expiring.len(), 1);
    assert!(review.expiring[0].contains("rule charge"));
    assert_eq!(
        review.incidents,
        ["2026-12-01T11:00:01.000000Z enforcement_lost"]
    );
    assert_eq!(review.first.as_deref(), Some("2026-12-01T10:00:00Z"));
    assert_eq!(review.last.as_deref(), Some("2026-12-01T11:00:00Z"));
}

#[test]
fn the_timeline_holds_every_decision_once() {
    let review = Review::build(&trail(), &snapshot(), &period());
    let t = &review.timeline;
    assert_eq!(t.buckets.len(), 4);
    let sum = t.buckets.iter().fold(Counts::default(), |mut a, b| {
        a.allow += b.allow;
        a.deny += b.deny;
        a.would_deny += b.would_deny;
        a.error += b.error;
        a
    });
    assert_eq!(sum, review.totals);
    // One hour in four buckets of 901 s: the first holds 10:00 and 10:10.
    assert_eq!(t.bucket_secs, 901);
    assert_eq!(t.buckets[0].allow, 2);
    // 10:50 and 11:00 (the last record) are in the last bucket.
    assert_eq!(t.buckets[3].deny, 2);
}

#[test]
fn the_period_filters_records() {
    let mut p = period();
    p.since = Some("2026-12-01T10:15:00Z".parse().unwrap());
    p.until = Some("2026-12-01T10:45:00Z".parse().unwrap());
    let review = Review::build(&trail(), &snapshot(), &p);
    assert_eq!(review.totals.allow, 0);
    assert_eq!(review.totals.deny, 3);
    // Nothing allowed in the period: every destination is unused.
    assert_eq!(review.unused.len(), 2);
    assert!(review.unused.iter().all(|u| u.contains("destination")));
}

#[test]
fn an_empty_trail_is_a_review_of_nothing() {
    let review = Review::build(&[], &snapshot(), &period());
    assert_eq!(review.totals.total(), 0);
    assert!(review.timeline.buckets.is_empty());
    assert_eq!(review.unused.len(), 2);
    let page = html::render(&review);
    assert!(page.contains("No decisions in the period."));
    assert!(review.summary().contains("decisions: 0 "));
}

#[test]
fn the_page_is_self_contained_and_escapes_what_workloads_wrote() {
    let mut trail = trail();
    trail.push(record(
        10,
        "2026-12-01T11:00:02.000000Z",
        serde_json::json!({"workload": "x\"><img src=//evil.test/a>", "decision": "deny",
                           "reason": "no_policy"}),
    ));
    let review = Review::build(&trail, &snapshot(), &period());
    let page = html::render(&review);
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("Content-Security-Policy\" content=\"default-src 'none'"));
    let lower = page.to_ascii_lowercase();
    assert!(
        !lower.contains("<script"),
        "the hostile path was not escaped"
    );
    assert!(
        !lower.contains("<img"),
        "the hostile workload name was not escaped"
    );
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    // Nothing is fetched: no element that loads, and the only URL is the SVG namespace.
    for tag in [
        "<link",
        "<iframe",
        "<object",
        "<embed",
        "<style src",
        "<use",
    ] {
        assert!(!lower.contains(tag), "{tag} in the page");
    }
    assert_eq!(
        lower.matches("://").count(),
        1,
        "the only URL is the SVG namespace"
    );
    assert!(page.contains("<b id=\"total-deny\">6</b>"), "{page}");
    assert!(page.contains("<span id=\"unused-count\">2</span>"));
    assert!(page.contains("<span id=\"connection-count\">1</span>"));
    assert!(page.contains("<svg id=\"timeline\""));
}
