//! A run record as database columns, and back: shared by the SQLite and PostgreSQL stores so
//! that both write and read the same shapes (times as microseconds since the Unix epoch,
//! parameters and argv as JSON text, the state as a status plus outcome columns). Output
//! chunks are in `chunk.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::run::{CancelReason, Exit, Outcome, Run, RunId, RunMode, RunState};

/// Microseconds since the Unix epoch.
pub(super) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The time `us` microseconds after the Unix epoch.
pub(super) fn from_micros(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// The columns of a run's state.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct StateColumns {
    pub status: String,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub pid: Option<u32>,
    pub stopping: bool,
    /// `exited | spawn_failed | cancelled | timed_out | lost | limit`.
    pub outcome: Option<&'static str>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// `request | shutdown`.
    pub cancel_reason: Option<&'static str>,
    /// A spawn error, or the limit that was exceeded.
    pub message: Option<String>,
    pub cancelled_by: Option<String>,
}

impl StateColumns {
    /// The columns of `state`.
    pub fn of(state: &RunState) -> Self {
        let mut c = StateColumns {
            status: state.status().as_str().to_owned(),
            ..Default::default()
        };
        let outcome = match state {
            RunState::Queued => None,
            RunState::Running {
                started_at,
                pid,
                stopping,
            } => {
                c.started_at = Some(micros(*started_at));
                c.pid = *pid;
                c.stopping = *stopping;
                None
            }
            RunState::Finished {
                started_at,
                pid,
                finished_at,
                outcome,
            } => {
                c.started_at = started_at.map(micros);
                c.finished_at = Some(micros(*finished_at));
                c.pid = *pid;
                Some(outcome)
            }
        };
        let exit = match outcome {
            None => None,
            Some(Outcome::Exited(e)) => {
                c.outcome = Some("exited");
                Some(*e)
            }
            Some(Outcome::SpawnFailed(m)) => {
                c.outcome = Some("spawn_failed");
                c.message = Some(m.clone());
                None
            }
            Some(Outcome::Cancelled { reason, exit, by }) => {
                c.outcome = Some("cancelled");
                c.cancel_reason = Some(match reason {
                    CancelReason::Request => "request",
                    CancelReason::Shutdown => "shutdown",
                });
                c.cancelled_by = by.clone();
                *exit
            }
            Some(Outcome::TimedOut { exit }) => {
                c.outcome = Some("timed_out");
                *exit
            }
            Some(Outcome::LimitExceeded { exit, limit }) => {
                c.outcome = Some("limit");
                c.message = Some(limit.clone());
                Some(*exit)
            }
            Some(Outcome::Lost) => {
                c.outcome = Some("lost");
                None
            }
        };
        match exit {
            Some(Exit::Code(code)) => c.exit_code = Some(code),
            Some(Exit::Signal(sig)) => c.signal = Some(sig),
            None => {}
        }
        c
    }
}

/// The state columns as read back (owned strings).
#[derive(Debug, Default)]
pub(super) struct StoredState {
    pub status: String,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub pid: Option<u32>,
    pub stopping: bool,
    pub outcome: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub cancel_reason: Option<String>,
    pub message: Option<String>,
    pub cancelled_by: Option<String>,
}

impl StoredState {
    /// The state these columns describe.
    pub fn into_state(self) -> Result<RunState, String> {
        let exit = match (self.exit_code, self.signal) {
            (Some(c), _) => Some(Exit::Code(c)),
            (None, Some(s)) => Some(Exit::Signal(s)),
            (None, None) => None,
        };
        let started_at = self.started_at.map(from_micros);
        Ok(match self.status.as_str() {
            "queued" => RunState::Queued,
            "running" => RunState::Running {
                started_at: started_at.unwrap_or(UNIX_EPOCH),
                pid: self.pid,
                stopping: self.stopping,
            },
            _ => {
                let need_exit = || exit.ok_or_else(|| "a finished run without its exit".to_owned());
                let outcome = match self.outcome.as_deref() {
                    Some("exited") => Outcome::Exited(need_exit()?),
                    Some("spawn_failed") => Outcome::SpawnFailed(self.message.unwrap_or_default()),
                    Some("cancelled") => Outcome::Cancelled {
                        reason: if self.cancel_reason.as_deref() == Some("shutdown") {
                            CancelReason::Shutdown
                        } else {
                            CancelReason::Request
                        },
                        exit,
                        by: self.cancelled_by,
                    },
                    Some("timed_out") => Outcome::TimedOut { exit },
                    Some("limit") => Outcome::LimitExceeded {
                        exit: need_exit()?,
                        limit: self.message.unwrap_or_default(),
                    },
                    Some("lost") => Outcome::Lost,
                    other => return Err(format!("unknown outcome {other:?}")),
                };
                RunState::Finished {
                    started_at,
                    pid: self.pid,
                    finished_at: self.finished_at.map_or(UNIX_EPOCH, from_micros),
                    outcome,
                }
            }
        })
    }
}

/// The columns a delivery attempt's result sets, as the SQL engines write them.
pub(super) struct DeliveryColumns {
    pub state: &'static str,
    /// µs; `None` keeps the column as it is.
    pub next_at: Option<i64>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    /// µs.
    pub done_at: Option<i64>,
}

impl DeliveryColumns {
    /// The columns of `r`, done now.
    pub fn of(r: &super::DeliveryResult) -> Self {
        use super::DeliveryResult;
        let now = micros(SystemTime::now());
        match r {
            DeliveryResult::Delivered { status } => Self {
                state: "delivered",
                next_at: None,
                last_status: Some(i32::from(*status)),
                last_error: None,
                done_at: Some(now),
            },
            DeliveryResult::Retry {
                next_at,
                status,
                error,
            } => Self {
                state: "pending",
                next_at: Some(micros(*next_at)),
                last_status: status.map(i32::from),
                last_error: Some(error.clone()),
                done_at: None,
            },
            DeliveryResult::Failed { status, error } => Self {
                state: "failed",
                next_at: None,
                last_status: status.map(i32::from),
                last_error: Some(error.clone()),
                done_at: Some(now),
            },
        }
    }
}

/// The fields of a run's record besides its state, as read back.
pub(super) struct StoredRun {
    pub id: RunId,
    pub module_id: String,
    pub module_name: String,
    pub parameters: String,
    pub argv: String,
    pub mode: String,
    pub timeout_ms: i64,
    pub created_at: i64,
    pub output_lines: i64,
    pub created_by: Option<String>,
    /// JSON array of URLs, or none.
    pub callbacks: Option<String>,
    /// µs.
    pub cancel_requested_at: Option<i64>,
    pub state: StoredState,
}

impl StoredRun {
    /// The run these columns describe.
    pub fn into_run(self) -> Result<Run, String> {
        let parameters = match serde_json::from_str(&self.parameters) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err("bad parameters".into()),
        };
        let argv = serde_json::from_str(&self.argv).map_err(|_| "bad argv".to_owned())?;
        let mode: RunMode = self.mode.parse().map_err(|_| "bad mode".to_owned())?;
        let state = self.state.into_state()?;
        // A store of one node does not count attempts: a run that started did so once.
        let attempt = u32::from(matches!(
            state,
            RunState::Running { .. }
                | RunState::Finished {
                    started_at: Some(_),
                    ..
                }
        ));
        Ok(Run {
            id: self.id,
            module_id: self.module_id,
            module_name: self.module_name,
            parameters,
            argv,
            mode,
            timeout: Duration::from_millis(self.timeout_ms.max(0) as u64),
            created_at: from_micros(self.created_at),
            state,
            output_lines: self.output_lines.max(0) as u64,
            created_by: self.created_by,
            attempt,
            callbacks: match self.callbacks {
                None => Vec::new(),
                Some(text) => {
                    serde_json::from_str(&text).map_err(|_| "bad callbacks".to_owned())?
                }
            },
            cancel_requested_at: self.cancel_requested_at.map(from_micros),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_columns() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let states = [
            RunState::Queued,
            RunState::Running {
                started_at: t,
                pid: Some(42),
                stopping: true,
            },
            RunState::Finished {
                started_at: Some(t),
                pid: Some(42),
                finished_at: t,
                outcome: Outcome::Cancelled {
                    reason: CancelReason::Shutdown,
                    exit: Some(Exit::Signal(15)),
                    by: Some("ci".into()),
                },
            },
            RunState::Finished {
                started_at: None,
                pid: None,
                finished_at: t,
                outcome: Outcome::LimitExceeded {
                    exit: Exit::Code(153),
                    limit: "cpu (1s)".into(),
                },
            },
            RunState::Finished {
                started_at: Some(t),
                pid: None,
                finished_at: t,
                outcome: Outcome::SpawnFailed("nope".into()),
            },
        ];
        for s in states {
            let c = StateColumns::of(&s);
            let back = StoredState {
                status: c.status,
                started_at: c.started_at,
                finished_at: c.finished_at,
                pid: c.pid,
                stopping: c.stopping,
                outcome: c.outcome.map(str::to_owned),
                exit_code: c.exit_code,
                signal: c.signal,
                cancel_reason: c.cancel_reason.map(str::to_owned),
                message: c.message,
                cancelled_by: c.cancelled_by,
            }
            .into_state()
            .unwrap();
            assert_eq!(back, s);
        }
    }
}
