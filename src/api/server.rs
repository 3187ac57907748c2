//! The HTTP/1.1 server loop (hyper, under the axum router), with what `axum::serve` does not
//! do and a server on a network needs:
//!
//! - a client that has not sent a whole request header within `header_timeout` (from its
//!   first byte, or from the connection's start) is disconnected; a keep-alive connection with
//!   no request in flight is closed after `idle_timeout`;
//! - at most `max_connections` connections: past it a new one is answered a 503 and closed,
//!   never left hanging, and a (rate-limited) log line says so; when the process runs out of
//!   file descriptors, a spare one kept for that purpose lets it answer the same 503;
//! - TLS (rustls) when configured, the handshake bounded by `header_timeout`;
//! - graceful shutdown: stop accepting, let in-flight requests finish, close idle connections.
//!
//! Every connection is a task on one tracker, with a span; the listener waits for them all.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::Instrument;

use crate::tls::TlsConfig;

/// Connection limits and timeouts.
#[derive(Clone)]
pub struct ServerSettings {
    /// A request header must be complete this long after its first byte (or after the
    /// connection opened).
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
    /// Open connections at most; past it new ones get a 503 and are closed.
    pub max_connections: usize,
    /// Serve HTTPS with this configuration.
    pub tls: Option<TlsConfig>,
}

/// Connections being refused (a 503 written, the socket drained and closed) at once, at most;
/// past it an over-limit connection is closed without an answer. Overflow policy: close.
const REFUSING: usize = 256;
/// How long a refused connection is given to take its 503.
const REFUSE_TIME: Duration = Duration::from_millis(500);
/// At most one "connection limit reached" line per this long (with a count).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The body of a 503 for a connection over the limit.
const OVER_LIMIT: &str = "{\"type\":\"urn:modrun:problem:unavailable\",\"title\":\"Service unavailable\",\"status\":503,\"detail\":\"too many connections; try again later\"}";

/// Serve `router` on `listener` until `stop` fires, then shut the connections down gracefully
/// and return once they are all closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ServerSettings,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let conns = TaskTracker::new();
    let close_all = CancellationToken::new();
    let over_limit = RateLimited::new("connection limit reached: new connections get a 503");
    let out_of_fds = RateLimited::new("cannot accept connections: out of file descriptors");
    // A spare descriptor, closed to make room for one more accept when the process has run
    // out of them (so that the client gets its 503 instead of waiting in the backlog).
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_out_of_fds(&e) => {
                out_of_fds.hit();
                // Make room with the spare, answer one waiting client at once (no time to
                // wait for its request), take the spare back.
                if spare.take().is_some()
                    && let Ok(Ok((tcp, _))) =
                        tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
                {
                    refuse_now(tcp).await;
                }
                spare = std::fs::File::open("/dev/null").ok();
                if spare.is_none() {
                    // Nothing was freed: wait for a connection to end.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    spare = std::fs::File::open("/dev/null").ok();
                }
                continue;
            }
            Err(e) => {
                // A connection reset before it was accepted, and the like.
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            over_limit.hit();
            refuse(tcp, &refusing, &conns);
            continue;
        };
        let span = tracing::debug_span!("conn", peer = %peer);
        conns.spawn(
            connection(
                tcp,
                slot,
                router.clone(),
                settings.clone(),
                close_all.clone(),
            )
            .instrument(span),
        );
    }
    close_all.cancel();
    conns.close();
    conns.wait().await;
    Ok(())
}

fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Answer a connection over the limit with a 503 and close it, in a task of its own (at most
/// [`REFUSING`] at once; past that it is closed at once).
fn refuse(mut tcp: TcpStream, refusing: &Arc<Semaphore>, conns: &TaskTracker) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    conns.spawn(async move {
        let _permit = permit;
        let answer = over_limit_answer();
        let _ = tokio::time::timeout(REFUSE_TIME, async {
            // Let the client send its request head first (a client that sees an answer
            // before it has written its request may take it for a broken connection).
            let mut head = Vec::new();
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(REFUSE_TIME / 2, async {
                while head.len() < 16 * 1024 && memchr::memmem::find(&head, b"\r\n\r\n").is_none() {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            tcp.write_all(answer.as_bytes()).await?;
            tcp.shutdown().await?;
            // Drain what the client sent, so that closing does not reset the connection
            // before it has read the answer.
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// The 503 of an over-limit connection, as bytes on the wire.
fn over_limit_answer() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{OVER_LIMIT}",
        OVER_LIMIT.len()
    )
}

/// Answer 503 and close, at once (out of file descriptors: the descriptor is needed back).
/// What the client already sent is drained first, so that the close does not reset the
/// connection before the answer is read.
async fn refuse_now(mut tcp: TcpStream) {
    let mut sink = [0u8; 4096];
    while matches!(tcp.try_read(&mut sink), Ok(n) if n > 0) {}
    let _ = tokio::time::timeout(Duration::from_millis(50), async {
        tcp.write_all(over_limit_answer().as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
}

/// One connection: optional TLS, then HTTP/1.1 until the client leaves, a timeout fires or
/// the server shuts down.
async fn connection(
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    router: Router,
    settings: ServerSettings,
    close: CancellationToken,
) {
    let activity = Arc::new(Activity::new(settings.header_timeout));
    match &settings.tls {
        None => http(tcp, router, &settings, activity, close).await,
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            match tokio::time::timeout(settings.header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => http(stream, router, &settings, activity, close).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
}

async fn http<IO>(
    io: IO,
    router: Router,
    settings: &ServerSettings,
    activity: Arc<Activity>,
    close: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let tracked = activity.clone();
    let idle_timeout = settings.idle_timeout;
    let service = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        let activity = tracked.clone();
        activity.request_started();
        let call = router.clone().oneshot(req.map(Body::new));
        async move {
            let res: Response = call.await?;
            Ok::<_, std::convert::Infallible>(res.map(|body| {
                Body::new(Tracked {
                    inner: body,
                    done: Some(Done {
                        activity,
                        idle_timeout,
                    }),
                })
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let expired = activity.clone();
    let expired = expired.expired();
    tokio::pin!(expired);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            () = close.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            kind = &mut expired, if !closing => match kind {
                Waiting::Header => {
                    tracing::debug!("no complete request header in time: disconnecting");
                    return;
                }
                Waiting::Idle => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            },
        }
    }
}

/// What a connection is waiting for when no request is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The (rest of the) header of a request.
    Header,
    /// Nothing: the client may send another request.
    Idle,
}

/// A connection's timers: which deadline applies now. A std mutex: each section reads or sets
/// three fields.
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the watcher when the deadline changes.
    changed: Notify,
    header_timeout: Duration,
}

struct ActivityState {
    in_flight: usize,
    waiting: Waiting,
    /// `None` while a request is in flight.
    deadline: Option<Instant>,
}

impl Activity {
    fn new(header_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                waiting: Waiting::Header,
                deadline: Some(Instant::now() + header_timeout),
            }),
            changed: Notify::new(),
            header_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: if the connection was idle, a header has begun and must complete in
    /// time.
    fn bytes_read(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && s.waiting == Waiting::Idle {
            s.waiting = Waiting::Header;
            s.deadline = Some(Instant::now() + self.header_timeout);
            drop(s);
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        let mut s = self.lock();
        s.in_flight += 1;
        s.deadline = None;
        drop(s);
        self.changed.notify_one();
    }

    fn response_done(&self, idle_timeout: Duration) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.waiting = Waiting::Idle;
            s.deadline = Some(Instant::now() + idle_timeout);
        }
        drop(s);
        self.changed.notify_one();
    }

    /// Resolves when the current deadline passes, with what the connection was waiting for.
    async fn expired(self: Arc<Self>) -> Waiting {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (deadline, waiting) = {
                let s = self.lock();
                (s.deadline, s.waiting)
            };
            match deadline {
                None => notified.await,
                Some(d) if d <= Instant::now() => return waiting,
                Some(d) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(d.into()) => {}
                        () = notified => {}
                    }
                }
            }
        }
    }
}

/// The connection's socket, reporting reads to its [`Activity`].
struct Watched<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks the response done (the connection idle again) when it is dropped.
struct Done {
    activity: Arc<Activity>,
    idle_timeout: Duration,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.activity.response_done(self.idle_timeout);
    }
}

/// A response body that tells the connection's [`Activity`] when it has been sent (or
/// dropped): until then the request is in flight, whatever its length (an SSE stream).
struct Tracked {
    inner: Body,
    done: Option<Done>,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            self.done.take();
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A warning logged at most once per [`LOG_EVERY`], with how many times it happened meanwhile.
struct RateLimited {
    what: &'static str,
    count: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl RateLimited {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            count: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    fn hit(&self) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            self.count.store(0, Ordering::Relaxed);
            tracing::warn!(times = n, "{}", self.what);
        }
    }
}
