//! Completion callbacks: when a run reaches a final status, modrun POSTs the run (JSON, as
//! `GET /runs/{id}` shows it) to each of its callback URLs (the module's, then the
//! request's), signed as Standard Webhooks does:
//!
//! - `webhook-id`: `msg_<run id>_<n>`, the same at every attempt (a receiver drops duplicates);
//! - `webhook-timestamp`: seconds since the Unix epoch, of this attempt;
//! - `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one per
//!   signing key, space-separated (several during a key rotation).
//!
//! Delivery is durable and at least once: the store writes a pending delivery per URL in the
//! same transaction as the run's final status; the [`Deliverer`] (on every node) claims due
//! deliveries, holding each while it is tried, and records what each attempt came to. A 2xx
//! answer delivers; anything else (an error, a timeout, another status, a redirect, which is
//! never followed) is retried with exponential backoff from 1 s to 10 min, or at a 429/503's
//! `Retry-After`, until `callbacks.retry_for` after the run ended, when it is given up.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Live;
use crate::metrics::{Metrics, ResultLabel};
use crate::store::{DeliveryResult, DueDelivery, RunStore};

/// Deliveries claimed (and tried at once) per round, at most.
const BATCH: usize = 16;
/// How often the deliverer looks for due deliveries when nothing woke it.
const POLL: Duration = Duration::from_millis(500);
/// The first retry's delay; it doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between attempts (a `Retry-After` may ask for more, up to an hour).
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The longest URL accepted.
const MAX_URL: usize = 2048;

/// A signing key (`whsec_` + base64 of 24 to 64 bytes). Never printed.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

impl SigningKey {
    /// Parse `whsec_<base64>`; the error never repeats the secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text.trim().strip_prefix("whsec_").ok_or(
            "must be `whsec_` followed by base64 (Standard Webhooks' format), e.g. from `echo whsec_$(openssl rand -base64 32)`",
        )?;
        let bytes = B64
            .decode(b64)
            .map_err(|_| "the part after `whsec_` is not valid base64".to_owned())?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(format!(
                "must hold 24 to 64 bytes of key (it holds {})",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` value: a signature by each key, space-separated.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: u64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A callback URL: `http://` or `https://`, a host, printable ASCII without spaces, at most
/// 2048 bytes.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL {
        return Err(format!("a URL of at most {MAX_URL} bytes"));
    }
    if !url.bytes().all(|c| c.is_ascii_graphic()) {
        return Err("a URL is printable ASCII without spaces".into());
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must be an http:// or https:// URL")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains('@') {
        return Err("must name a host (and no user or password)".into());
    }
    Ok(())
}

/// An allow-list prefix: a URL with at least the `/` after its host, so that
/// `https://hooks.example.com/` cannot be matched by `https://hooks.example.com.evil.net/`.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    check_url(prefix)?;
    let rest = prefix.split_once("://").map_or("", |(_, r)| r);
    if !rest.contains('/') {
        return Err(format!(
            "must end its host with a path (`{prefix}/`), or any host that starts the same would match"
        ));
    }
    Ok(())
}

/// How a callback URL is shown (in the log and in `GET /runs/{id}`): its scheme and host, and
/// `/…` for the rest. A URL's path or query may be its secret (many receivers put their
/// token there), so neither is ever shown.
pub fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (host, tail) = rest.split_at(end);
    if tail.is_empty() || tail == "/" {
        format!("{scheme}://{host}/")
    } else {
        format!("{scheme}://{host}/…")
    }
}

/// Whether a request may name `url`: it is a valid URL under one of `prefixes`.
pub fn allowed(url: &str, prefixes: &[String]) -> bool {
    check_url(url).is_ok() && prefixes.iter().any(|p| url.starts_with(p.as_str()))
}

/// The delay before attempt `attempts + 1` (after `attempts` failed ones).
fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempts.min(20))
        .min(MAX_BACKOFF)
}

/// Sends due deliveries, on every node.
pub struct Deliverer {
    store: Arc<dyn RunStore>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    /// Fired when a run ends here, so that its deliveries go out at once rather than at the
    /// next poll. A `Notify` keeps at most one wake-up: nothing queues.
    wake: Arc<Notify>,
}

impl Deliverer {
    /// A deliverer over `store`, with the keys, timeout and retry period of the configuration
    /// in force (a reload changes them).
    pub fn new(
        store: Arc<dyn RunStore>,
        live: Arc<Live>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("modrun/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            store,
            live,
            metrics,
            client,
            wake,
        })
    }

    /// Deliver until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let more = match self.round().await {
                Ok(n) => n == BATCH,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the due callbacks; trying again");
                    false
                }
            };
            if more {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Claim and try one batch; how many were claimed.
    async fn round(&self) -> Result<usize, crate::store::StoreError> {
        let snapshot = self.live.get();
        if snapshot.config.callbacks.keys.is_empty() {
            // Nothing can be signed (so nothing was configured): no query at all.
            return Ok(0);
        }
        let timeout = snapshot.config.callbacks.timeout;
        // Held past the attempt's timeout: if this node dies meanwhile, another tries again.
        let hold = timeout + Duration::from_secs(5);
        let due = self
            .store
            .claim_deliveries(SystemTime::now(), hold, BATCH)
            .await?;
        let n = due.len();
        futures_util::future::join_all(due.into_iter().map(|d| {
            let span = tracing::info_span!("callback", run_id = %d.run_id, webhook_id = %d.id);
            self.attempt(d).instrument(span)
        }))
        .await;
        Ok(n)
    }

    /// One attempt of one delivery, and its record.
    async fn attempt(&self, d: DueDelivery) {
        let snapshot = self.live.get();
        let cfg = &snapshot.config.callbacks;
        let result = match self.store.get(d.run_id).await {
            Ok(Some(run)) => {
                let body = serde_json::to_vec(&crate::api::run_json(&run)).unwrap_or_default();
                let (status, error, retry_after) = self.post(&d, &body, cfg).await;
                self.judge(&d, status, error, retry_after, cfg.retry_for)
            }
            Ok(None) => DeliveryResult::Failed {
                status: None,
                error: "the run is no longer retained".into(),
            },
            Err(e) => DeliveryResult::Retry {
                next_at: SystemTime::now() + backoff(d.attempts),
                status: None,
                error: format!("cannot read the run: {e}"),
            },
        };
        let label = match &result {
            DeliveryResult::Delivered { .. } => "delivered",
            DeliveryResult::Retry { .. } => "retry",
            DeliveryResult::Failed { .. } => "failed",
        };
        match &result {
            DeliveryResult::Delivered { status } => {
                tracing::info!(url = %shown_url(&d.url), status, attempt = d.attempts + 1, "callback delivered");
            }
            DeliveryResult::Retry { error, .. } => {
                tracing::info!(url = %shown_url(&d.url), error = %error, attempt = d.attempts + 1, "callback failed; it will be retried");
            }
            DeliveryResult::Failed { error, .. } => {
                tracing::warn!(url = %shown_url(&d.url), error = %error, attempts = d.attempts + 1, "callback given up");
            }
        }
        self.metrics
            .callbacks
            .get_or_create(&ResultLabel { result: label })
            .inc();
        if let Err(e) = self.store.record_delivery(d.id.clone(), result).await {
            // Held until the hold lapses, then tried again: at least once.
            tracing::warn!(error = %e, "cannot record a callback attempt");
        }
    }

    /// POST the body; (status, error, Retry-After).
    async fn post(
        &self,
        d: &DueDelivery,
        body: &[u8],
        cfg: &crate::config::CallbacksConfig,
    ) -> (Option<u16>, Option<String>, Option<Duration>) {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let signature = signature_header(&cfg.keys, &d.id, timestamp, body);
        let sent = self
            .client
            .post(&d.url)
            .timeout(cfg.timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(res) => {
                let status = res.status().as_u16();
                let retry_after = res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s.min(3600)));
                if res.status().is_success() {
                    (Some(status), None, None)
                } else if res.status().is_redirection() {
                    (
                        Some(status),
                        Some(format!("answered {status} (redirects are not followed)")),
                        None,
                    )
                } else {
                    (
                        Some(status),
                        Some(format!("answered {status}")),
                        retry_after,
                    )
                }
            }
            Err(e) if e.is_timeout() => (
                None,
                Some(format!(
                    "no answer within {}",
                    humantime::format_duration(cfg.timeout)
                )),
                None,
            ),
            // Without the URL: the record and the log show only its host.
            Err(e) => (
                None,
                Some(format!("cannot send: {}", error_chain(&e.without_url()))),
                None,
            ),
        }
    }

    /// What an attempt came to.
    fn judge(
        &self,
        d: &DueDelivery,
        status: Option<u16>,
        error: Option<String>,
        retry_after: Option<Duration>,
        retry_for: Duration,
    ) -> DeliveryResult {
        let Some(error) = error else {
            return DeliveryResult::Delivered {
                status: status.unwrap_or(200),
            };
        };
        let delay = match (status, retry_after) {
            (Some(429 | 503), Some(after)) => after,
            _ => backoff(d.attempts),
        };
        let next_at = SystemTime::now() + delay;
        let deadline = d.created_at + retry_for;
        if next_at > deadline {
            return DeliveryResult::Failed {
                status,
                error: format!("{error}; gave up after {} attempts", d.attempts + 1),
            };
        }
        DeliveryResult::Retry {
            next_at,
            status,
            error,
        }
    }
}

/// An error with its causes, on one line (reqwest's own message names only the outer one).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification signs as it says.
    #[test]
    fn signs_as_standard_webhooks() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// Keys, URLs and prefixes are checked; a prefix must end its host.
    #[test]
    fn keys_urls_and_prefixes() {
        assert!(SigningKey::parse("nope").is_err());
        assert!(SigningKey::parse("whsec_!!!").is_err());
        assert!(SigningKey::parse("whsec_c2hvcnQ=").is_err());
        assert!(
            format!(
                "{:?}",
                SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
            )
            .contains("***")
        );
        assert!(check_url("https://hooks.example.com/x?y=1").is_ok());
        assert!(check_url("ftp://x/").is_err());
        assert!(check_url("https:///x").is_err());
        assert!(check_url("https://user:pw@x/").is_err());
        assert!(check_url("https://x/ y").is_err());
        assert!(check_prefix("https://hooks.example.com").is_err());
        assert!(check_prefix("https://hooks.example.com/").is_ok());
        let allow = vec!["https://hooks.example.com/".to_owned()];
        assert!(allowed("https://hooks.example.com/a", &allow));
        assert!(!allowed("https://hooks.example.com.evil.net/a", &allow));
        assert!(!allowed("http://hooks.example.com/a", &allow));
        assert_eq!(
            shown_url("https://hooks.slack.com/services/T0/B0/secret?x=1"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(shown_url("http://10.0.0.1:8080"), "http://10.0.0.1:8080/");
        assert_eq!(shown_url("http://h/?token=s"), "http://h/…");
    }

    /// Backoff doubles from 1 s and stops at 10 min.
    #[test]
    fn backoff_grows_and_stops() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
