//! The review as one self-contained HTML page: inline CSS and inline SVG only, no script,
//! no font, no image or style from anywhere (a Content-Security-Policy of `default-src
//! 'none'` says so to the browser too), so the file can be mailed, archived with the
//! review and opened offline. Every value from the audit trail (paths, hosts, reasons,
//! workload names: written by workloads, so hostile) is HTML-escaped. Figures a reader
//! (or a test) looks for carry stable `id`s: `total-allow`, `total-deny`,
//! `total-would_deny`, `total-error`, `unused-count`, `expiring-count`,
//! `connection-count`, `chain-state`.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};

use super::{Counts, Denied, Review, Timeline};

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}\
td.n{text-align:right}.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20;font-weight:bold}\
.cards{display:flex;gap:1em}.card{border:1px solid #ccc;padding:.5em 1em}.card b{font-size:1.6em;display:block}\
.unused{background:#fff3e0}code{font-size:.95em}";

/// Colours of the decisions in the chart (allow, deny, would_deny, error).
const COLOURS: [(&str, &str); 4] = [
    ("allow", "#2e7d32"),
    ("deny", "#c62828"),
    ("would_deny", "#ef6c00"),
    ("error", "#6a1b9a"),
];

/// Renders `review` as an HTML document.
pub fn render(review: &Review) -> String {
    let mut h = String::with_capacity(16 * 1024);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
    );
    let period = format!(
        "{} .. {}",
        review.first.as_deref().unwrap_or("-"),
        review.last.as_deref().unwrap_or("-")
    );
    let _ = write!(
        h,
        "<title>scopegate access review {}</title><style>{STYLE}</style></head><body>",
        text(&period)
    );
    let _ = write!(
        h,
        "<h1>scopegate access review</h1><p>Period <span id=\"period\">{}</span>, from {} audit file(s): {}</p>",
        text(&period),
        review.files.len(),
        text(&review.files.join(", "))
    );
    chain(&mut h, review);
    totals(&mut h, &review.totals);
    h.push_str("<h2>Decisions over time</h2>");
    chart(&mut h, &review.timeline);
    workloads(&mut h, review);
    h.push_str("<h2>Top denied requests</h2>");
    denied_table(&mut h, &review.top_denied, "top-denied");
    let _ = write!(
        h,
        "<h2>Connection-level denies (kernel hooks): <span id=\"connection-count\">{}</span></h2>",
        review
            .connection_denies
            .iter()
            .map(|d| d.count)
            .sum::<u64>()
    );
    denied_table(&mut h, &review.connection_denies, "connection-denies");
    list(&mut h, "Unused grants", "unused", &review.unused);
    list(&mut h, "Expiring grants", "expiring", &review.expiring);
    list(&mut h, "Incidents", "incidents", &review.incidents);
    h.push_str("</body></html>\n");
    h
}

fn chain(h: &mut String, review: &Review) {
    match &review.chain {
        None => h.push_str("<p>Hash chain: <span id=\"chain-state\">not verified</span></p>"),
        Some(c) => match &c.damage {
            None => {
                let _ = write!(
                    h,
                    "<p>Hash chain: <span id=\"chain-state\" class=\"ok\">intact</span> ({} records verified)</p>",
                    c.records
                );
            }
            Some(d) => {
                let _ = write!(
                    h,
                    "<p>Hash chain: <span id=\"chain-state\" class=\"bad\">DAMAGED</span>: {}</p>",
                    text(d)
                );
            }
        },
    }
}

fn totals(h: &mut String, t: &Counts) {
    h.push_str("<h2>Decisions</h2><div class=\"cards\">");
    for (name, n) in [
        ("allow", t.allow),
        ("deny", t.deny),
        ("would_deny", t.would_deny),
        ("error", t.error),
    ] {
        let _ = write!(
            h,
            "<div class=\"card\"><b id=\"total-{name}\">{n}</b>{name}</div>"
        );
    }
    h.push_str("</div>");
}

/// A stacked bar per interval, as inline SVG.
fn chart(h: &mut String, t: &Timeline) {
    let max = t.buckets.iter().map(Counts::total).max().unwrap_or(0);
    if max == 0 {
        h.push_str("<p>No decisions in the period.</p>");
        return;
    }
    let (width, height, bar) = (720u64, 160u64, 720 / t.buckets.len().max(1) as u64);
    let _ = write!(
        h,
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" role=\"img\" aria-label=\"decisions over time\">",
        height + 20
    );
    for (i, b) in t.buckets.iter().enumerate() {
        let x = i as u64 * bar;
        let mut y = height;
        for ((name, colour), n) in COLOURS.iter().zip([b.allow, b.deny, b.would_deny, b.error]) {
            if n == 0 {
                continue;
            }
            let bar_h = (n * height).div_ceil(max);
            y = y.saturating_sub(bar_h);
            let _ = write!(
                h,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{bar_h}\" fill=\"{colour}\"><title>{name}: {n}</title></rect>",
                bar.saturating_sub(1).max(1)
            );
        }
    }
    let _ = write!(
        h,
        "<text x=\"0\" y=\"{}\" font-size=\"11\">{} (each bar {} s; peak {max})</text></svg>",
        height + 15,
        text(t.start.as_deref().unwrap_or("")),
        t.bucket_secs
    );
    h.push_str("<p>");
    for (name, colour) in COLOURS {
        let _ = write!(h, "<span style=\"color:{colour}\">&#9632;</span> {name} ");
    }
    h.push_str("</p>");
}

fn workloads(h: &mut String, review: &Review) {
    h.push_str("<h2>Workloads and grants</h2>");
    for w in &review.workloads {
        let c = &w.counts;
        let _ = write!(
            h,
            "<h3 id=\"workload-{}\">{} <small>({})</small></h3><p>{} decisions: allow {}, deny {}, would_deny {}, error {}</p>",
            attr(&w.name),
            text(&w.name),
            text(w.mode.as_deref().unwrap_or("not in the policy")),
            c.total(),
            c.allow,
            c.deny,
            c.would_deny,
            c.error
        );
        if w.grants.is_empty() {
            continue;
        }
        h.push_str("<table><tr><th>destination</th><th>rule</th><th>methods</th><th>allowed requests</th><th>used</th><th>expires</th></tr>");
        for g in &w.grants {
            let used = g.allows > 0;
            let _ = write!(
                h,
                "<tr{}><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
                if used { "" } else { " class=\"unused\"" },
                text(&g.destination),
                text(&g.rule),
                text(&g.methods.join(" ")),
                g.allows,
                if used { "yes" } else { "no" },
                text(g.expires.as_deref().unwrap_or("-"))
            );
        }
        h.push_str("</table>");
    }
}

fn denied_table(h: &mut String, rows: &[Denied], id: &str) {
    if rows.is_empty() {
        h.push_str("<p>None.</p>");
        return;
    }
    let _ = write!(
        h,
        "<table id=\"{id}\"><tr><th>count</th><th>workload</th><th>decision</th><th>proto</th><th>method</th><th>destination</th><th>path / name</th><th>reason</th></tr>"
    );
    for d in rows {
        let _ = write!(
            h,
            "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            d.count,
            text(&d.workload),
            text(&d.decision),
            text(&d.proto),
            text(&d.method),
            text(&d.destination),
            text(&d.path),
            text(&d.reason)
        );
    }
    h.push_str("</table>");
}

fn list(h: &mut String, title: &str, id: &str, lines: &[String]) {
    let _ = write!(
        h,
        "<h2>{title}: <span id=\"{id}-count\">{}</span></h2>",
        lines.len()
    );
    if lines.is_empty() {
        h.push_str("<p>None.</p>");
        return;
    }
    let _ = write!(h, "<ul id=\"{id}\">");
    for line in lines {
        let _ = write!(h, "<li>{}</li>", text(line));
    }
    h.push_str("</ul>");
}
