//! The service's metrics, in the Prometheus text format (`GET /metrics`), through the
//! `prometheus-client` crate: counters and histograms are updated where things happen (atomics,
//! no lock on the hot paths once a label set exists); gauges that describe a state (queued and
//! running runs, the process's memory and files) are read at scrape time.
//!
//! Names start with `modrun_`, are in base units (seconds, bytes) and counters end in
//! `_total`. Labels are bounded by the configuration: a module id, a route template, a final
//! status, a stream, a store operation; never a run id, a token, a path or client text. The
//! process metrics use the standard `process_*` names that Prometheus's own clients export, so
//! existing dashboards work.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::run::{RunStatus, Stream};

/// The statuses a run ends in (the `status` label of `modrun_runs_finished_total`).
pub const FINAL_STATUSES: [RunStatus; 5] = [
    RunStatus::Succeeded,
    RunStatus::Failed,
    RunStatus::Cancelled,
    RunStatus::TimedOut,
    RunStatus::Lost,
];

/// Why `POST /runs` refused a run (the `reason` label of `modrun_runs_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 400, 413, 415, 422: the request or its parameters.
    Invalid,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404: no such module (or not one the token may see).
    UnknownModule,
    /// 409: an Idempotency-Key reused with another body.
    Conflict,
    /// 429: the queue is full.
    QueueFull,
    /// 503: starting, shutting down, or the store cannot write.
    Unavailable,
    /// Any other error status.
    Other,
}

impl Rejection {
    /// Every reason, for the series that exist from start-up.
    pub const ALL: [Rejection; 8] = [
        Rejection::Invalid,
        Rejection::Unauthorized,
        Rejection::Forbidden,
        Rejection::UnknownModule,
        Rejection::Conflict,
        Rejection::QueueFull,
        Rejection::Unavailable,
        Rejection::Other,
    ];

    /// The reason an error status of `POST /runs` stands for.
    pub fn from_status(status: u16) -> Self {
        match status {
            400 | 413 | 414 | 415 | 422 | 431 => Rejection::Invalid,
            401 => Rejection::Unauthorized,
            403 => Rejection::Forbidden,
            404 => Rejection::UnknownModule,
            409 => Rejection::Conflict,
            429 => Rejection::QueueFull,
            503 => Rejection::Unavailable,
            _ => Rejection::Other,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Invalid => "invalid",
            Rejection::Unauthorized => "unauthorized",
            Rejection::Forbidden => "forbidden",
            Rejection::UnknownModule => "unknown_module",
            Rejection::Conflict => "conflict",
            Rejection::QueueFull => "queue_full",
            Rejection::Unavailable => "unavailable",
            Rejection::Other => "other",
        }
    }
}

/// `module`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabel {
    /// The module id.
    pub module: String,
}

/// `module`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    /// The module id.
    pub module: String,
    /// A final status.
    pub status: &'static str,
}

/// `module`, `stream`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The module id.
    pub module: String,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
}

/// `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A [`Rejection`].
    pub reason: &'static str,
}

/// `method`, `route`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// A standard method, or `other`.
    pub method: &'static str,
    /// The route template (`/runs/{id}`), or `-` when no route matched.
    pub route: String,
    /// The status code.
    pub status: u16,
}

/// `method`, `route`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// A standard method, or `other`.
    pub method: &'static str,
    /// The route template, or `-`.
    pub route: String,
}

/// `op`: a store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `create`, `transition`, `append_output`, `finish`, `cancel_requested`, `purge`.
    pub op: &'static str,
}

/// `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// `version`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn queue_wait_buckets() -> Histogram {
    // 1 ms .. about 15 min.
    Histogram::new(exponential_buckets(0.001, 2.5, 16))
}

fn run_duration_buckets() -> Histogram {
    // 5 ms .. about 2 h.
    Histogram::new(exponential_buckets(0.005, 3.0, 14))
}

fn http_buckets() -> Histogram {
    // 0.25 ms .. about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

fn store_buckets() -> Histogram {
    // 50 us .. about 7 s.
    Histogram::new(exponential_buckets(0.000_05, 2.5, 14))
}

/// Every metric of one server. Shared (`Arc`) by the API, the runner and the registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `modrun_runs_accepted_total{module}`: `POST /runs` that created a run.
    pub runs_accepted: Family<ModuleLabel, Counter>,
    /// `modrun_runs_rejected_total{reason}`: `POST /runs` refused.
    pub runs_rejected: Family<ReasonLabel, Counter>,
    /// `modrun_runs_started_total{module}`: runs whose program was started (or tried).
    pub runs_started: Family<ModuleLabel, Counter>,
    /// `modrun_runs_finished_total{module,status}`.
    pub runs_finished: Family<FinishedLabels, Counter>,
    /// `modrun_spawn_failures_total{module}`: runs whose program could not be started.
    pub spawn_failures: Family<ModuleLabel, Counter>,
    /// `modrun_runs_truncated_total{module}`: runs that wrote more than `output.max_run_bytes`.
    pub runs_truncated: Family<ModuleLabel, Counter>,
    /// `modrun_runs_queued{module}`: set at scrape time.
    pub runs_queued: Family<ModuleLabel, Gauge>,
    /// `modrun_runs_running{module}`: set at scrape time.
    pub runs_running: Family<ModuleLabel, Gauge>,
    /// `modrun_run_queue_wait_seconds{module}`: from the request to the start.
    pub queue_wait: HistogramFamily<ModuleLabel>,
    /// `modrun_run_duration_seconds{module}`: from the start to the end.
    pub run_duration: HistogramFamily<ModuleLabel>,
    /// `modrun_output_lines_total{module,stream}`: lines read from runs' pipes.
    pub output_lines: Family<StreamLabels, Counter>,
    /// `modrun_output_bytes_total{module,stream}`: bytes read from runs' pipes.
    pub output_bytes: Family<StreamLabels, Counter>,
    /// `modrun_sse_streams_open`.
    pub sse_open: Gauge,
    /// `modrun_sse_streams_resumed_total`: streams opened with `Last-Event-ID`.
    pub sse_resumed: Counter,
    /// `modrun_http_requests_total{method,route,status}`.
    pub http_requests: Family<HttpLabels, Counter>,
    /// `modrun_http_request_duration_seconds{method,route}`: to the response head; SSE streams
    /// are left out (they last as long as their client wants).
    pub http_duration: HistogramFamily<RouteLabels>,
    /// `modrun_store_write_duration_seconds{op}`.
    pub store_write: HistogramFamily<OpLabel>,
    /// `modrun_store_errors_total{op}`.
    pub store_errors: Family<OpLabel, Counter>,
    /// `modrun_config_reloads_total{result}`.
    pub config_reloads: Family<ResultLabel, Counter>,
    /// `modrun_callbacks_total{result}`: completion callback attempts (`delivered`, `retry`,
    /// `failed`: given up).
    pub callbacks: Family<ResultLabel, Counter>,
    /// `modrun_log_lines_dropped_total`: set at scrape time from the log queue.
    log_dropped: Counter,
    process: ProcessGauges,
    /// Each module's series that every run updates, looked up once per module. Bounded by the
    /// modules ever configured (as the families themselves are).
    modules: RwLock<HashMap<String, Arc<ModuleMetrics>>>,
}

/// The series of one module that every run updates, as handles (they share their values with
/// the families): a run looks them up once, by the module id, instead of building a label set
/// (and its strings) and searching a family at each update.
#[derive(Debug)]
pub struct ModuleMetrics {
    /// `modrun_runs_accepted_total{module}`.
    pub accepted: Counter,
    /// `modrun_runs_started_total{module}`.
    pub started: Counter,
    /// `modrun_spawn_failures_total{module}`.
    pub spawn_failures: Counter,
    /// `modrun_runs_truncated_total{module}`.
    pub truncated: Counter,
    /// `modrun_run_queue_wait_seconds{module}`.
    pub queue_wait: Histogram,
    /// `modrun_run_duration_seconds{module}`.
    pub duration: Histogram,
    /// `modrun_runs_finished_total{module,status}`, in [`FINAL_STATUSES`] order.
    finished: [Counter; FINAL_STATUSES.len()],
    /// `modrun_output_{lines,bytes}_total{module,stream}`.
    pub output: OutputMeter,
}

impl ModuleMetrics {
    /// A run of the module ended with `status` after `ran` (`None`: it never started).
    pub fn finished(&self, status: RunStatus, ran: Option<Duration>) {
        if let Some(i) = FINAL_STATUSES.iter().position(|s| *s == status) {
            self.finished[i].inc();
        }
        if let Some(d) = ran {
            self.duration.observe(d.as_secs_f64());
        }
    }
}

/// The standard process metrics, read from `/proc/self` at scrape time.
#[derive(Debug, Default)]
struct ProcessGauges {
    rss: Gauge,
    vsize: Gauge,
    fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
    cpu: Counter<f64, std::sync::atomic::AtomicU64>,
    start: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, at zero.
    pub fn new() -> Self {
        let m = Metrics {
            runs_accepted: Family::default(),
            runs_rejected: Family::default(),
            runs_started: Family::default(),
            runs_finished: Family::default(),
            spawn_failures: Family::default(),
            runs_truncated: Family::default(),
            runs_queued: Family::default(),
            runs_running: Family::default(),
            queue_wait: Family::new_with_constructor(queue_wait_buckets),
            run_duration: Family::new_with_constructor(run_duration_buckets),
            output_lines: Family::default(),
            output_bytes: Family::default(),
            sse_open: Gauge::default(),
            sse_resumed: Counter::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(http_buckets),
            store_write: Family::new_with_constructor(store_buckets),
            store_errors: Family::default(),
            config_reloads: Family::default(),
            callbacks: Family::default(),
            log_dropped: Counter::default(),
            process: ProcessGauges::default(),
            registry: Registry::default(),
            modules: RwLock::default(),
        };
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("modrun");
        r.register(
            "runs_accepted",
            "Runs created by POST /runs",
            m.runs_accepted.clone(),
        );
        r.register(
            "runs_rejected",
            "POST /runs refused, by reason",
            m.runs_rejected.clone(),
        );
        r.register(
            "runs_started",
            "Runs whose program was started (or tried)",
            m.runs_started.clone(),
        );
        r.register(
            "runs_finished",
            "Runs that reached a final status",
            m.runs_finished.clone(),
        );
        r.register(
            "spawn_failures",
            "Runs whose program could not be started",
            m.spawn_failures.clone(),
        );
        r.register(
            "runs_truncated",
            "Runs whose output passed output.max_run_bytes",
            m.runs_truncated.clone(),
        );
        r.register(
            "runs_queued",
            "Runs waiting for a slot (in a cluster: in the shared queue)",
            m.runs_queued.clone(),
        );
        r.register(
            "runs_running",
            "Runs holding a slot on this node",
            m.runs_running.clone(),
        );
        r.register_with_unit(
            "run_queue_wait",
            "From the request to the start of the run",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register_with_unit(
            "run_duration",
            "From the start of the run to its end",
            Unit::Seconds,
            m.run_duration.clone(),
        );
        r.register(
            "output_lines",
            "Lines read from runs' output pipes",
            m.output_lines.clone(),
        );
        r.register_with_unit(
            "output",
            "Bytes read from runs' output pipes",
            Unit::Bytes,
            m.output_bytes.clone(),
        );
        r.register(
            "sse_streams_open",
            "Server-Sent Events streams open now",
            m.sse_open.clone(),
        );
        r.register(
            "sse_streams_resumed",
            "Streams opened with Last-Event-ID",
            m.sse_resumed.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests answered, by route template",
            m.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "Time to the response head (SSE streams left out)",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        r.register_with_unit(
            "store_write_duration",
            "Writes to the run store",
            Unit::Seconds,
            m.store_write.clone(),
        );
        r.register(
            "store_errors",
            "Writes the run store failed",
            m.store_errors.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            m.config_reloads.clone(),
        );
        r.register(
            "callbacks",
            "Completion callback attempts, by result",
            m.callbacks.clone(),
        );
        r.register(
            "log_lines_dropped",
            "Log lines dropped because the log sink was too slow",
            m.log_dropped.clone(),
        );
        let build: Family<VersionLabel, Gauge> = Family::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The modrun version (always 1)", build);
        for reason in Rejection::ALL {
            let _ = m.runs_rejected.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        for result in ["ok", "error"] {
            let _ = m.config_reloads.get_or_create(&ResultLabel { result });
        }
        for result in ["delivered", "retry", "failed"] {
            let _ = m.callbacks.get_or_create(&ResultLabel { result });
        }
        for op in STORE_OPS {
            let _ = m.store_write.get_or_create(&OpLabel { op });
            let _ = m.store_errors.get_or_create(&OpLabel { op });
        }
        let p = &m.process;
        root.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            p.rss.clone(),
        );
        root.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            p.vsize.clone(),
        );
        root.register("process_open_fds", "Open file descriptors", p.fds.clone());
        root.register(
            "process_max_fds",
            "The limit on open file descriptors",
            p.max_fds.clone(),
        );
        root.register("process_threads", "OS threads", p.threads.clone());
        root.register_with_unit(
            "process_cpu",
            "User and system CPU time spent (a counter)",
            Unit::Seconds,
            p.cpu.clone(),
        );
        root.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            p.start.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// Make the per-module series exist at 0 (a module × every final status, and so on), so
    /// that a dashboard and `rate()` see them before the first run.
    pub fn declare_modules<'a>(&self, modules: impl IntoIterator<Item = &'a str>) {
        for module in modules {
            let m = ModuleLabel {
                module: module.to_owned(),
            };
            let _ = self.runs_queued.get_or_create(&m);
            let _ = self.runs_running.get_or_create(&m);
            let _ = self.module(module);
        }
    }

    /// The series of `module` that its runs update (created at 0 the first time).
    pub fn module(&self, module: &str) -> Arc<ModuleMetrics> {
        let known = self
            .modules
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(module)
            .cloned();
        if let Some(m) = known {
            return m;
        }
        let label = ModuleLabel {
            module: module.to_owned(),
        };
        let stream = |family: &Family<StreamLabels, Counter>, stream: Stream| {
            family
                .get_or_create(&StreamLabels {
                    module: module.to_owned(),
                    stream: stream.as_str(),
                })
                .clone()
        };
        let made = Arc::new(ModuleMetrics {
            accepted: self.runs_accepted.get_or_create(&label).clone(),
            started: self.runs_started.get_or_create(&label).clone(),
            spawn_failures: self.spawn_failures.get_or_create(&label).clone(),
            truncated: self.runs_truncated.get_or_create(&label).clone(),
            queue_wait: self.queue_wait.get_or_create(&label).clone(),
            duration: self.run_duration.get_or_create(&label).clone(),
            finished: FINAL_STATUSES.map(|status| {
                self.runs_finished
                    .get_or_create(&FinishedLabels {
                        module: module.to_owned(),
                        status: status.as_str(),
                    })
                    .clone()
            }),
            output: OutputMeter {
                lines: [
                    stream(&self.output_lines, Stream::Stdout),
                    stream(&self.output_lines, Stream::Stderr),
                ],
                bytes: [
                    stream(&self.output_bytes, Stream::Stdout),
                    stream(&self.output_bytes, Stream::Stderr),
                ],
            },
        });
        self.modules
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(module.to_owned())
            .or_insert(made)
            .clone()
    }

    /// A run ended with `status` after `ran` (`None`: it never started).
    pub fn run_finished(&self, module: &str, status: RunStatus, ran: Option<Duration>) {
        self.module(module).finished(status, ran);
    }

    /// A store write `op` took `took`; `ok` says whether it succeeded.
    pub fn store_write(&self, op: &'static str, took: Duration, ok: bool) {
        let l = OpLabel { op };
        self.store_write
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if !ok {
            self.store_errors.get_or_create(&l).inc();
        }
    }

    /// The counters of one run's output, for its pipe readers (they add to them without
    /// looking the labels up again).
    pub fn output_meter(&self, module: &str) -> OutputMeter {
        self.module(module).output.clone()
    }

    /// The whole text exposition, with the scrape-time gauges read first. `load` is this
    /// node's queued and running runs by module.
    pub fn render(&self, load: &Load) -> String {
        for (family, counts) in [
            (&self.runs_queued, &load.queued),
            (&self.runs_running, &load.running),
        ] {
            // Modules with nothing queued (or running) now read 0, not their last value.
            family.clear();
            for (module, n) in counts {
                family
                    .get_or_create(&ModuleLabel {
                        module: module.clone(),
                    })
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            for module in &load.modules {
                let _ = family.get_or_create(&ModuleLabel {
                    module: module.clone(),
                });
            }
        }
        let dropped = crate::telemetry::dropped();
        let seen = self.log_dropped.get();
        if dropped > seen {
            self.log_dropped.inc_by(dropped - seen);
        }
        self.process.read();
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# the metrics could not be encoded");
        }
        out
    }
}

/// The `Content-Type` of [`Metrics::render`]'s text (the Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The store operations timed by [`Metrics::store_write`].
pub const STORE_OPS: [&str; 6] = [
    "create",
    "transition",
    "append_output",
    "finish",
    "cancel_requested",
    "purge",
];

/// This node's runs by module, read from the scheduler at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Load {
    /// Queued runs by module id.
    pub queued: Vec<(String, usize)>,
    /// Runs holding a slot by module id.
    pub running: Vec<(String, usize)>,
    /// Every module of the catalog (their series read 0 when absent above).
    pub modules: Vec<String>,
}

/// One run's output counters by stream (stdout, stderr).
#[derive(Debug, Clone, Default)]
pub struct OutputMeter {
    lines: [Counter; 2],
    bytes: [Counter; 2],
}

impl OutputMeter {
    /// `lines` lines of `bytes` bytes were read from `stream`.
    pub fn add(&self, stream: Stream, lines: usize, bytes: usize) {
        let i = match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        };
        if lines > 0 {
            self.lines[i].inc_by(lines as u64);
        }
        if bytes > 0 {
            self.bytes[i].inc_by(bytes as u64);
        }
    }
}

impl ProcessGauges {
    /// Read `/proc/self`; a value that cannot be read keeps its last one.
    fn read(&self) {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .unwrap_or(100) as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096);
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            // Fields after the command name, numbered from 3 (state) as in proc(5).
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
            if let (Some(u), Some(s)) = (field(14), field(15)) {
                let total = (u + s) as f64 / ticks;
                let seen = self.cpu.get();
                if total > seen {
                    self.cpu.inc_by(total - seen);
                }
            }
            if let Some(t) = field(20) {
                self.threads.set(t as i64);
            }
            if let Some(v) = field(23) {
                self.vsize.set(v as i64);
            }
            if let Some(r) = field(24) {
                self.rss.set(r as i64 * page);
            }
            if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                self.start.set(boot + start as f64 / ticks);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.fds.set(dir.count() as i64);
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            self.max_fds.set(i64::try_from(soft).unwrap_or(i64::MAX));
        }
    }
}

/// The boot time (seconds since the epoch), from `/proc/stat`.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Declared modules have every series at 0; counts add up; names follow the conventions.
    #[test]
    fn series_exist_at_zero_and_count() {
        let m = Metrics::new();
        m.declare_modules(["hello"]);
        let text = m.render(&Load::default());
        assert_eq!(
            value(
                &text,
                r#"modrun_runs_finished_total{module="hello",status="timed_out"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&text, r#"modrun_runs_rejected_total{reason="queue_full"}"#),
            Some(0.0)
        );
        assert_eq!(
            value(&text, r#"modrun_build_info{version="0.1.0"}"#),
            Some(1.0)
        );
        assert!(value(&text, "process_resident_memory_bytes").unwrap() > 0.0);
        assert!(value(&text, "process_open_fds").unwrap() > 0.0);
        m.run_finished(
            "hello",
            RunStatus::Succeeded,
            Some(Duration::from_millis(20)),
        );
        m.output_meter("hello").add(Stream::Stderr, 2, 10);
        let load = Load {
            queued: vec![("hello".into(), 3)],
            running: vec![],
            modules: vec!["hello".into()],
        };
        let text = m.render(&load);
        assert_eq!(
            value(
                &text,
                r#"modrun_runs_finished_total{module="hello",status="succeeded"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"modrun_output_bytes_total{module="hello",stream="stderr"}"#
            ),
            Some(10.0)
        );
        assert_eq!(
            value(&text, r#"modrun_runs_queued{module="hello"}"#),
            Some(3.0)
        );
        assert_eq!(
            value(&text, r#"modrun_runs_running{module="hello"}"#),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                r#"modrun_run_duration_seconds_count{module="hello"}"#
            ),
            Some(1.0)
        );
    }
}
