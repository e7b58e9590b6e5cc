//! The TLS scenario: TLS interception through the real eBPF redirect, keep-alive and a new
//! TLS connection per request, next to plain HTTP through the same agent, with the agent's
//! CPU per request. The origin is plain HTTP on 127.0.0.1 (the intercept destination is
//! `localhost`, which the agent resolves to that address); wrk runs in the managed cgroup.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    Env, READY_LINE, Settings, client_command, nofile_limit,
    procs::{self, CgroupTree, PinDir, Proc},
    start_nginx, workload,
};

/// Runs the scenario and returns its Markdown section.
pub(super) fn run(
    env: &Env,
    settings: &Settings,
    cgroup_mount: &Path,
    prefix: &str,
) -> Result<String> {
    eprintln!("\n==> bench: TLS interception (keep-alive and new TLS connection per request)");
    let dir = env.work.join("tls");
    for sub in ["policies", "tmp"] {
        fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tree = CgroupTree::new(cgroup_mount, &format!("{prefix}-tls"))?;
    let managed = tree.child("managed")?;
    let pins = PinDir::new(
        &env.bin,
        PathBuf::from("/sys/fs/bpf").join(format!("{prefix}-tls")),
    );

    let origin: SocketAddr =
        format!("127.0.0.1:{}", procs::free_port("127.0.0.1", None)?).parse()?;
    let conf = dir.join("origin.conf");
    fs::write(
        &conf,
        workload::nginx_upstream_conf(&dir, origin, nofile_limit()),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    let mut origin_proc = start_nginx(env, "tls-origin", &conf, settings.loadgen_cpu)?;
    origin_proc.wait_listening(origin)?;

    let policy = format!(
        "workload: tlsbench\nselect:\n  cgroup: {managed}\negress:\n  - host: localhost\n    port: {port}\n    allow_internal: true\n    tls: intercept\n    upstream_tls: false\n    rules:\n      - {{id: all-tls, methods: [GET], path: /**}}\n  - host: 127.0.0.1\n    port: {port}\n    rules:\n      - {{id: all-plain, methods: [GET], path: /**}}\n",
        port = origin.port()
    );
    fs::write(dir.join("policies/tls.yaml"), policy).context("writing the TLS policy")?;
    let proxy_port = procs::free_port("127.0.0.1", Some("::1"))?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", settings.proxy_cpu])
        .arg(&env.bin)
        .arg("run")
        .arg("--policies")
        .arg(dir.join("policies"))
        .arg("--proxy-port")
        .arg(proxy_port.to_string())
        .arg("--pin-dir")
        .arg(&pins.dir)
        .arg("--cgroup-root")
        .arg(&tree.dir)
        .arg("--audit-file")
        .arg(dir.join("audit.jsonl"))
        .arg("--no-audit-stdout")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .env("TOKIO_WORKER_THREADS", "1")
        .env("NO_COLOR", "1");
    let mut agent = Proc::spawn("tls agent", cmd, &dir.join("agent.log"), None)?;
    agent.wait_log_line(READY_LINE, Duration::from_secs(30))?;
    let pid = agent.pid()?;

    let secs = settings.wrk_secs().max(1);
    let cases = [
        (
            "plain HTTP, keep-alive",
            format!("http://127.0.0.1:{}/x", origin.port()),
            false,
        ),
        (
            "TLS intercept, keep-alive",
            format!("https://localhost:{}/x", origin.port()),
            false,
        ),
        (
            "plain HTTP, new connection per request",
            format!("http://127.0.0.1:{}/x", origin.port()),
            true,
        ),
        (
            "TLS intercept, new TLS connection per request",
            format!("https://localhost:{}/x", origin.port()),
            true,
        ),
    ];
    let mut md = String::from(
        "\n## TLS interception (through the redirect)\n\nwrk -t1 -c32 in the managed cgroup; origin plain HTTP on 127.0.0.1; one agent on the proxy CPU, median of the repetitions.\n\n| path | req/s | agent CPU µs/req | non-2xx + socket errors |\n|---|---:|---:|---:|\n",
    );
    let mut cpu_of = Vec::new();
    for (label, url, close) in &cases {
        let mut rps = Vec::new();
        let mut cpu = Vec::new();
        let mut errors = 0u64;
        for _ in 0..settings.reps {
            let before = procs::tree_cpu_ticks(pid)?;
            let mut wrk = client_command(env, Some(settings.loadgen_cpu), Some(&managed), "wrk");
            wrk.args(["-t1", "-c32", &format!("-d{secs}s")]);
            if *close {
                wrk.args(["-H", "Connection: close"]);
            }
            wrk.arg(url);
            let out = procs::run_ok(&mut wrk, Duration::from_secs(secs + 60))?;
            let after = procs::tree_cpu_ticks(pid)?;
            let (requests, per_sec, errs) = parse_wrk(&out)?;
            if requests == 0 {
                bail!("wrk completed no request against {url}:\n{out}");
            }
            rps.push(per_sec);
            cpu.push((after - before) as f64 / env.clk_tck * 1e6 / requests as f64);
            errors += errs;
        }
        let (rps, cpu) = (median(&mut rps), median(&mut cpu));
        eprintln!("bench: tls {label:<48} {rps:>8.0} req/s  CPU/req {cpu:>6.1}  errors {errors}");
        let _ = writeln!(md, "| {label} | {rps:.0} | {cpu:.1} | {errors} |");
        cpu_of.push(cpu);
    }
    if let [_, _, plain_close, tls_close] = cpu_of[..] {
        let _ = writeln!(
            md,
            "\nA full TLS handshake (leaf cached after the first connection) costs the agent about {:.0} µs of CPU per new connection.",
            tls_close - plain_close
        );
    }
    agent.stop();
    origin_proc.stop();
    Ok(md)
}

/// (requests, requests/s, non-2xx + socket errors) from wrk's output.
fn parse_wrk(out: &str) -> Result<(u64, f64, u64)> {
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no `N requests in` line from wrk")?;
    let per_sec = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no `Requests/sec:` line from wrk")?;
    let mut errors = 0;
    for line in out.lines() {
        if let Some(n) = line.trim().strip_prefix("Non-2xx or 3xx responses:") {
            errors += n.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(rest) = line.trim().strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Ok((requests, per_sec, errors))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() -> Result<()> {
        let out = "Running 2s test @ https://localhost:1/x\n  1 threads and 32 connections\n  4000 requests in 2.00s, 1.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:   1999.50\n";
        assert_eq!(parse_wrk(out)?, (4000, 1999.5, 7));
        assert!(parse_wrk("garbage").is_err());
        Ok(())
    }
}
