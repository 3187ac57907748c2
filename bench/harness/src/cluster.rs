//! The cluster scenario: modrun nodes on one PostgreSQL against one node on the embedded
//! SQLite store, measured in the same round. On 2 cores every node, the database and the load
//! generator share the same CPUs, so this measures what the shared store costs, not scaling.
//!
//! - run throughput with 1, 2 and 3 nodes (`wrk` against every node, connections split);
//! - claim latency: from sending `POST /runs` to the child's first instruction (the child is
//!   `date +%s%N`; same host, same clock), one run at a time;
//! - line latency from a child on one node to an SSE client on another;
//! - claim latency through the shared queue (the accepting node is full);
//! - lines/s of one noisy run written through PostgreSQL by one node and streamed by another.
//!
//! PostgreSQL is at `MODRUN_BENCH_PG_URL` (else `MODRUN_TEST_PG_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test`); every measurement gets a schema of its own,
//! dropped after it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::procs::{self, Server};
use crate::{Ctx, MODRUN_OK, Table, base_config, consume, median, modules, percentile, post_run};

const SCENARIO: &str = "8 cluster";

fn base_url() -> String {
    std::env::var("MODRUN_BENCH_PG_URL")
        .or_else(|_| std::env::var("MODRUN_TEST_PG_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// What the cluster scenario adds to the bench's modules.
const CLUSTER_MODULES: &str = r#"
[[modules]]
id = "stamp"
command = ["date", "+%s%N"]

[[modules]]
id = "node_ticks"
command = ["python3", "-u", "-c", "import os, sys, time\nprint(os.environ.get('NODE_NAME', '?'), flush=True)\nfor i in range(int(sys.argv[1])):\n    print(time.monotonic_ns(), flush=True)\n    time.sleep(0.01)", ]
[[modules.parameters]]
name = "n"
type = "integer"
positional = true
required = true
"#;

/// One schema, and the nodes on it.
struct Nodes {
    schema: Option<String>,
    admin: Option<tokio_postgres::Client>,
    nodes: Vec<Server>,
}

impl Nodes {
    /// `n` nodes on a fresh schema, or (`n == 0`) one node on SQLite.
    async fn start(ctx: &Ctx, admin_url: &str, n: usize) -> Result<Self, String> {
        let toml = base_config(
            "data",
            &format!("{}{CLUSTER_MODULES}", modules(&ctx.true_path)),
        )
        .replacen(
            "[runner]\n",
            "[runner]\nenv_allow = [\"PATH\", \"NODE_NAME\"]\n",
            1,
        );
        if n == 0 {
            let node = procs::modrun_with_env(&ctx.modrun, &toml, &[("NODE_NAME", "sqlite")]).await;
            return Ok(Self {
                schema: None,
                admin: None,
                nodes: vec![node],
            });
        }
        let admin = connect(admin_url).await?;
        let schema = format!(
            "bench_{}_{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros()
        );
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .map_err(|e| format!("cannot create a schema: {e}"))?;
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        let url = format!("{admin_url}{sep}options=-csearch_path%3D{schema}");
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            nodes.push(
                procs::modrun_with_env(
                    &ctx.modrun,
                    &toml,
                    &[("MODRUN_STORAGE_URL", &url), ("NODE_NAME", &name)],
                )
                .await,
            );
        }
        Ok(Self {
            schema: Some(schema),
            admin: Some(admin),
            nodes,
        })
    }

    async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
        if let (Some(admin), Some(schema)) = (self.admin, self.schema) {
            let _ = admin
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await;
        }
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("PostgreSQL is not reachable ({e}); set MODRUN_BENCH_PG_URL"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Runs per second of `/bin/true` with `?wait`, `clients` wrk connections split over the nodes.
async fn throughput(ctx: &Ctx, nodes: &Nodes, t: &mut Table, label: &str) -> f64 {
    let p = ctx.plan;
    let per = p.clients.div_ceil(nodes.nodes.len()).max(1);
    let loads = nodes.nodes.iter().map(|node| {
        let url = node.url("/runs?wait=10");
        async move {
            procs::wrk(
                &url,
                Some(r#"{"module_id":"true"}"#),
                Some(MODRUN_OK),
                per,
                p.load_for,
            )
            .await
        }
    });
    let results = futures_util::future::join_all(loads).await;
    let (mut ok, mut errors, mut secs) = (0, 0, 0f64);
    for r in &results {
        ok += r.ok;
        errors += r.errors;
        secs = secs.max(r.elapsed.as_secs_f64());
    }
    if errors > 0 || ok == 0 {
        t.fail(format!(
            "cluster throughput ({label}): {errors} errors, {ok} ok"
        ));
    }
    ok as f64 / secs.max(1e-9)
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Fill every slot of node 1 (`runner.max_concurrent` = 50 in the bench's config) with runs
/// that sleep, so that what it accepts next goes through the shared queue.
async fn fill_first_node(ctx: &Ctx, nodes: &Nodes, t: &mut Table) -> bool {
    for _ in 0..50 {
        let res = ctx
            .client
            .post(nodes.nodes[0].url("/runs"))
            .json(&json!({"module_id": "sleep"}))
            .send()
            .await;
        let run: serde_json::Value = match res {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
            _ => serde_json::Value::Null,
        };
        if run["status"] != "running" {
            t.fail(format!(
                "cluster: a filler run did not start at once: {run}"
            ));
            return false;
        }
    }
    true
}

/// From sending `POST /runs` to the child's first instruction, ms, one run at a time, posted
/// round-robin to the nodes (`via_queue`: all to node 1, which is full, so another node claims
/// them from the shared queue).
async fn claim_latency(
    ctx: &Ctx,
    nodes: &Nodes,
    count: usize,
    via_queue: bool,
    t: &mut Table,
) -> Vec<f64> {
    let mut ms = Vec::with_capacity(count);
    for i in 0..count {
        let node = if via_queue {
            &nodes.nodes[0]
        } else {
            &nodes.nodes[i % nodes.nodes.len()]
        };
        let sent = now_ns();
        let res = ctx
            .client
            .post(node.url("/runs?wait=10"))
            .json(&json!({"module_id": "stamp"}))
            .send()
            .await;
        let run: serde_json::Value = match res {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
            Ok(r) => {
                t.fail(format!("claim latency: POST answered {}", r.status()));
                return ms;
            }
            Err(e) => {
                t.fail(format!("claim latency: {e}"));
                return ms;
            }
        };
        let id = run["id"].as_str().unwrap_or_default();
        // Any node: the output may have been written by another one.
        let other = &nodes.nodes[(i + 1) % nodes.nodes.len()];
        let text = match ctx
            .client
            .get(other.url(&format!("/runs/{id}/output")))
            .header("accept", "text/plain")
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        match text.trim().parse::<u128>() {
            Ok(started) => ms.push(started.saturating_sub(sent) as f64 / 1e6),
            Err(_) => {
                t.fail(format!("claim latency: run {id} printed {text:?}"));
                return ms;
            }
        }
    }
    ms.sort_by(f64::total_cmp);
    ms
}

fn monotonic_ns() -> u64 {
    crate::monotonic_ns()
}

/// Lines printed every 10 ms by a child on one node, timed at an SSE client of every node:
/// (delays seen on the other nodes, delays seen on the executing node), ms, sorted.
async fn line_latency(ctx: &Ctx, nodes: &Nodes, n: u64, t: &mut Table) -> (Vec<f64>, Vec<f64>) {
    let id = post_run(
        ctx,
        &nodes.nodes[0],
        json!({"module_id": "node_ticks", "parameters": {"n": n}}),
    )
    .await;
    let follow = nodes.nodes.iter().enumerate().map(|(i, node)| {
        let url = node.url(&format!("/runs/{id}/stream"));
        let client = ctx.client.clone();
        async move {
            let mut executor = String::new();
            let mut delays = Vec::new();
            let Ok(res) = client.get(url).send().await else {
                return (i, executor, delays);
            };
            crate::sse::follow(
                res,
                Duration::from_secs(60) + Duration::from_millis(n * 20),
                |ev| {
                    if ev.kind == "stdout"
                        && let Ok(l) = serde_json::from_slice::<crate::sse::LineData>(ev.data)
                    {
                        match l.line.trim().parse::<u64>() {
                            Ok(sent) => {
                                delays.push(monotonic_ns().saturating_sub(sent) as f64 / 1e6);
                            }
                            Err(_) => executor = l.line.trim().to_owned(),
                        }
                    }
                },
            )
            .await;
            (i, executor, delays)
        }
    });
    let seen = futures_util::future::join_all(follow).await;
    let (mut cross, mut local) = (Vec::new(), Vec::new());
    for (i, executor, delays) in seen {
        if delays.len() as u64 != n {
            t.fail(format!(
                "cluster line latency: node {} got {} of {n} lines",
                i + 1,
                delays.len()
            ));
        }
        if executor == format!("n{}", i + 1) {
            local.extend(delays);
        } else {
            cross.extend(delays);
        }
    }
    cross.sort_by(f64::total_cmp);
    local.sort_by(f64::total_cmp);
    (cross, local)
}

/// Lines/s of one noisy run, from POST to the stream's end, posted to and streamed from the
/// first node (in the cluster round it is full, so another node runs it).
async fn noisy(ctx: &Ctx, nodes: &Nodes, n: u64, t: &mut Table, label: &str) -> Option<f64> {
    let node = &nodes.nodes[0];
    let t0 = Instant::now();
    let id = post_run(
        ctx,
        node,
        json!({"module_id": "lines", "parameters": {"n": n}}),
    )
    .await;
    match consume(ctx, node, &id, Some(79)).await {
        Ok((lines, _, status)) if lines == n && status == "succeeded" => {
            Some(n as f64 / t0.elapsed().as_secs_f64())
        }
        Ok((lines, _, status)) => {
            t.fail(format!(
                "cluster noisy run ({label}): {lines} of {n} lines, status {status}"
            ));
            None
        }
        Err(e) => {
            t.fail(format!("cluster noisy run ({label}): {e}"));
            None
        }
    }
}

pub async fn scenario_cluster(ctx: &Ctx, t: &mut Table, required: bool) {
    let p = ctx.plan;
    let url = base_url();
    if let Err(e) = connect(&url).await {
        if required {
            t.fail(format!("cluster: {e}"));
        } else {
            eprintln!("cluster scenario skipped: {e}");
        }
        return;
    }
    let rounds = p.rounds.min(3);
    let claims = if p.quick { 20 } else { 200 };
    let ticks = (p.latency_for.as_millis() / 10) as u64;
    let noisy_lines = p.output_lines.min(1_000_000);
    let mut tput: [Vec<f64>; 4] = Default::default();
    let (mut claim_p50, mut claim_p99, mut sq_claim_p50, mut sq_claim_p99) =
        (vec![], vec![], vec![], vec![]);
    let (mut cross_p50, mut cross_p99, mut local_p99) = (vec![], vec![], vec![]);
    let (mut queue_p50, mut queue_p99) = (vec![], vec![]);
    let (mut pg_lps, mut sq_lps) = (vec![], vec![]);
    for round in 0..rounds {
        for (k, values) in tput.iter_mut().enumerate() {
            let label = if k == 0 {
                "SQLite".to_owned()
            } else {
                format!("{k} PostgreSQL node(s)")
            };
            let nodes = match Nodes::start(ctx, &url, k).await {
                Ok(n) => n,
                Err(e) => {
                    t.fail(format!("cluster: {e}"));
                    return;
                }
            };
            values.push(throughput(ctx, &nodes, t, &label).await);
            nodes.stop().await;
        }
        eprintln!(
            "  round {round}: SQLite {:.0}/s, PostgreSQL 1 node {:.0}/s, 2 nodes {:.0}/s, 3 nodes {:.0}/s",
            tput[0][round], tput[1][round], tput[2][round], tput[3][round]
        );
        // Claim latency and the noisy run: one SQLite node against two PostgreSQL nodes.
        for k in [0, 2] {
            let nodes = match Nodes::start(ctx, &url, k).await {
                Ok(n) => n,
                Err(e) => {
                    t.fail(format!("cluster: {e}"));
                    return;
                }
            };
            let ms = claim_latency(ctx, &nodes, claims, false, t).await;
            if !ms.is_empty() {
                let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
                if k == 0 {
                    sq_claim_p50.push(p50);
                    sq_claim_p99.push(p99);
                } else {
                    claim_p50.push(p50);
                    claim_p99.push(p99);
                }
            }
            if k == 2 {
                // The first node stays full from here on.
                if fill_first_node(ctx, &nodes, t).await {
                    let ms = claim_latency(ctx, &nodes, claims, true, t).await;
                    if !ms.is_empty() {
                        queue_p50.push(percentile(&ms, 0.5));
                        queue_p99.push(percentile(&ms, 0.99));
                    }
                }
                let (cross, local) = line_latency(ctx, &nodes, ticks, t).await;
                if !cross.is_empty() {
                    cross_p50.push(percentile(&cross, 0.5));
                    cross_p99.push(percentile(&cross, 0.99));
                }
                if !local.is_empty() {
                    local_p99.push(percentile(&local, 0.99));
                }
            }
            let label = if k == 0 { "SQLite" } else { "PostgreSQL" };
            if let Some(lps) = noisy(ctx, &nodes, noisy_lines, t, label).await {
                if k == 0 { &mut sq_lps } else { &mut pg_lps }.push(lps);
            }
            nodes.stop().await;
        }
    }
    let c = p.clients;
    let sqlite = tput[0].clone();
    for (k, label) in [(1, "1 node"), (2, "2 nodes"), (3, "3 nodes")] {
        t.add(
            SCENARIO,
            &format!("runs/s, PostgreSQL, {label}, {c} wrk connections in all"),
            "/s",
            tput[k].clone(),
            Some(("1 node, SQLite", sqlite.clone())),
            None,
        );
    }
    t.add(
        SCENARIO,
        "claim latency p50 (POST to the child running), 2 nodes, a free slot",
        "ms",
        claim_p50,
        Some(("1 node, SQLite", sq_claim_p50)),
        None,
    );
    t.add(
        SCENARIO,
        "claim latency p99, 2 nodes",
        "ms",
        claim_p99,
        Some(("1 node, SQLite", sq_claim_p99)),
        None,
    );
    t.add(
        SCENARIO,
        "claim latency through the queue (node A full, node B claims), p50",
        "ms",
        queue_p50,
        None,
        None,
    );
    t.add(
        SCENARIO,
        "claim latency through the queue, p99",
        "ms",
        queue_p99,
        None,
        None,
    );
    t.add(
        SCENARIO,
        "line latency p50, child on node B to SSE client on node A",
        "ms",
        cross_p50,
        None,
        None,
    );
    let ok = median(&cross_p99) < 50.0;
    t.add(
        SCENARIO,
        "line latency p99, node B to node A",
        "ms",
        cross_p99,
        Some(("SSE client on node B", local_p99)),
        Some(("p99 < 50 ms", ok)),
    );
    t.add(
        SCENARIO,
        &format!(
            "lines/s, one run of {noisy_lines} x 80 B on node B, streamed from node A, POST to end"
        ),
        "/s",
        pg_lps,
        Some(("1 node, SQLite", sq_lps)),
        None,
    );
}
