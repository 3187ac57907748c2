//! Wiring: build the state from a configuration, serve a bound listener until a shutdown future
//! fires, then shut down in order.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::output::OutputLimits;
use crate::runner::{ModuleRunner, RunnerSettings};

/// Build the runner a configuration describes.
pub fn runner_for(config: &Config) -> ModuleRunner {
    ModuleRunner::new(RunnerSettings {
        max_concurrent: config.runner.max_concurrent,
        max_queued: config.runner.max_queued,
        kill_grace: config.runner.kill_grace,
        output: OutputLimits {
            max_line_bytes: config.output.max_line_bytes.get(),
            max_run_bytes: config.output.max_run_bytes,
        },
        keep_runs: config.retention.keep_runs,
    })
}

/// Serve `listener` until `shutdown` completes, then:
/// 1. stop accepting connections; requests still arriving on open ones get 503;
/// 2. cancel running runs (the same path as `DELETE`), leave queued runs queued, and wait for
///    the running ones to record their final status (at most `kill_grace` + 1 s);
/// 3. send every open SSE stream its `end` event and close it; answer pending `?wait` requests;
/// 4. return once the connections are closed (at most about 1 s more).
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let config = Arc::new(config);
    let runner = runner_for(&config);
    let state = AppState::new(config.clone(), runner.clone());
    let app = api::router(state.clone());

    let stop_accepting = CancellationToken::new();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(stop_accepting.clone().cancelled_owned())
        .into_future();
    tokio::pin!(server);

    tokio::select! {
        r = &mut server => return r,
        () = shutdown => {}
    }
    tracing::info!("shutting down: no new connections, cancelling running runs");
    state.draining.store(true, Ordering::Relaxed);
    stop_accepting.cancel();
    runner.shutdown();
    let grace = config.runner.kill_grace + Duration::from_secs(1);
    // Keep serving the open connections (streams see the runs end) while runs stop.
    let mut served = None;
    let idle = {
        let wait = runner.wait_idle(grace);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                idle = &mut wait => break idle,
                r = &mut server, if served.is_none() => served = Some(r),
            }
        }
    };
    if !idle {
        tracing::warn!("some runs did not stop within kill_grace + 1s");
    }
    state.streams_end.cancel();
    if served.is_none() {
        match tokio::time::timeout(Duration::from_millis(900), &mut server).await {
            Ok(r) => served = Some(r),
            Err(_) => tracing::warn!("connections still open after shutdown; closing them"),
        }
    }
    served.transpose()?;
    tracing::info!(queued = runner.queued(), "stopped");
    Ok(())
}
