//! One contract, three engines: every test here runs against the memory store, SQLite and
//! PostgreSQL (each test in a fresh database or schema; PostgreSQL at `MODRUN_TEST_PG_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! What differs is said where it differs: a shared store lets only the node that holds a
//! running run write to it (so runs written to here are created running, as a direct start
//! creates them, which every engine supports).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::run::{CancelReason, Outcome, RunStatus, Stream};

/// A store under test, and what to clean up after it.
struct Fixture {
    store: Arc<dyn RunStore>,
    _dir: Option<tempfile::TempDir>,
    #[cfg(feature = "postgres")]
    schema: Option<String>,
}

impl Fixture {
    async fn done(self) {
        #[cfg(feature = "postgres")]
        if let Some(schema) = self.schema {
            drop(self.store);
            pg::drop_schema(&schema).await;
        }
    }
}

#[cfg(feature = "postgres")]
pub(crate) mod pg {
    //! A schema of its own for each test.

    /// The test database.
    pub(crate) fn base_url() -> String {
        std::env::var("MODRUN_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    async fn admin() -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&base_url(), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL for the tests (MODRUN_TEST_PG_URL)");
        tokio::spawn(conn);
        client
    }

    /// A fresh schema; the URL that uses it.
    pub(crate) async fn fresh_schema() -> (String, String) {
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        admin()
            .await
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create schema");
        let sep = if base_url().contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}options=-csearch_path%3D{schema}", base_url());
        (schema, url)
    }

    pub(crate) async fn drop_schema(schema: &str) {
        let _ = admin()
            .await
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await;
    }
}

async fn memory() -> Fixture {
    Fixture {
        store: Arc::new(MemoryStore::new()),
        _dir: None,
        #[cfg(feature = "postgres")]
        schema: None,
    }
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
        .await
        .expect("open task")
        .expect("open SQLite");
    Fixture {
        store: Arc::new(store),
        _dir: Some(dir),
        #[cfg(feature = "postgres")]
        schema: None,
    }
}

#[cfg(feature = "postgres")]
async fn postgres() -> Fixture {
    let (schema, url) = pg::fresh_schema().await;
    let store = PgStore::open(PgSettings {
        url,
        addr: "127.0.0.1:0".into(),
        lease_ttl: Duration::from_secs(10),
        max_queued: 1000,
        pool_size: 4,
    })
    .await
    .expect("open PostgreSQL");
    Fixture {
        store,
        _dir: None,
        schema: Some(schema),
    }
}

fn run(module: &str, state: RunState) -> Run {
    Run {
        timeout: Duration::from_secs(1),
        state,
        ..Run::queued_for_test(module)
    }
}

fn running() -> RunState {
    RunState::Running {
        started_at: SystemTime::now(),
        pid: None,
        stopping: false,
    }
}

fn new(run: Run, key: Option<(&str, u64)>) -> NewRun {
    NewRun {
        run,
        key: key.map(|(k, fingerprint)| IdempotencyKey {
            key: k.into(),
            fingerprint,
        }),
        held: Default::default(),
        policy: RunPolicy::default(),
    }
}

fn finished(started: bool, t: SystemTime, outcome: Outcome) -> RunState {
    RunState::Finished {
        started_at: started.then_some(t),
        pid: None,
        finished_at: t,
        outcome,
    }
}

fn line(seq: u64, text: &str) -> Line {
    Line {
        seq,
        stream: if seq.is_multiple_of(2) {
            Stream::Stderr
        } else {
            Stream::Stdout
        },
        ts: SystemTime::now(),
        text: text.into(),
        raw: None,
    }
}

/// Every contract test, against every engine.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_memory {
            $(#[tokio::test] async fn $name() { let f = super::memory().await; super::$name(&*f.store).await; f.done().await; })*
        }
        mod on_sqlite {
            $(#[tokio::test] async fn $name() { let f = super::sqlite().await; super::$name(&*f.store).await; f.done().await; })*
        }
        #[cfg(feature = "postgres")]
        mod on_postgres {
            $(#[tokio::test] async fn $name() { let f = super::postgres().await; super::$name(&*f.store).await; f.done().await; })*
        }
    };
}

contract!(
    transitions_check_the_current_state,
    a_run_keeps_what_it_was_given,
    output_appends_are_idempotent_and_pages_read_back,
    idempotency_keys_give_one_run,
    purge_by_count_and_age_keeps_active_runs,
    purge_takes_the_oldest_finished_whatever_the_creation_order,
    listing_pages_newest_first_with_filters,
    a_final_status_brings_its_deliveries,
    a_cancel_request_is_noted_once_and_kept,
    a_run_ends_with_its_last_output_in_one_write,
);

async fn transitions_check_the_current_state(s: &dyn RunStore) {
    let r = run("a", RunState::Queued);
    let id = r.id;
    s.create(new(r, None)).await.unwrap();
    let now = SystemTime::now();
    // A queued run is not running: a transition that needs it running is refused (a shared
    // store says so as a fence: only a claim makes a run running there).
    let err = s
        .transition(id, Expect::Running, finished(true, now, Outcome::Lost))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::WrongState(_) | StoreError::Fenced(_)),
        "{err:?}"
    );
    let cancelled = Outcome::Cancelled {
        reason: CancelReason::Request,
        exit: None,
        by: Some("ops".into()),
    };
    s.transition(id, Expect::Active, finished(false, now, cancelled))
        .await
        .unwrap();
    let err = s
        .transition(id, Expect::Active, finished(false, now, Outcome::Lost))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::WrongState(r) if r.status() == RunStatus::Cancelled),
        "{err:?}"
    );
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.status(), RunStatus::Cancelled);
    assert_eq!(got.cancelled_by(), Some("ops"));
    assert!(s.get(RunId::new()).await.unwrap().is_none());
}

async fn a_run_keeps_what_it_was_given(s: &dyn RunStore) {
    let mut r = run("keep", running());
    r.parameters.insert("n".into(), serde_json::json!(3));
    r.argv = vec!["echo".into(), "***".into()];
    r.created_by = Some("ci".into());
    let id = r.id;
    s.create(new(r.clone(), None)).await.unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.status(), RunStatus::Running);
    assert_eq!(got.parameters, r.parameters);
    assert_eq!(got.argv, r.argv);
    assert_eq!(got.created_by.as_deref(), Some("ci"));
    assert_eq!(got.timeout, r.timeout);
    let t = SystemTime::now();
    let exit = Outcome::Exited(crate::run::Exit::Code(3));
    s.transition(id, Expect::Running, finished(true, t, exit))
        .await
        .unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.status(), RunStatus::Failed);
    assert_eq!(got.exit_code(), Some(3));
    assert!(got.finished_at().is_some());
}

/// A running run with its lines 1 and 2 stored.
async fn running_with_two_lines(s: &dyn RunStore) -> RunId {
    let r = run("a", running());
    let id = r.id;
    s.create(new(r, None)).await.unwrap();
    s.append_output(id, vec![line(1, "l1"), line(2, "l2")])
        .await
        .unwrap();
    id
}

async fn output_appends_are_idempotent_and_pages_read_back(s: &dyn RunStore) {
    let id = running_with_two_lines(s).await;
    // A batch retried after an ambiguous write overlaps what is stored.
    s.append_output(id, vec![line(2, "l2"), line(3, "l3")])
        .await
        .unwrap();
    let got: Vec<u64> = s
        .read_output(id, 1, 10)
        .await
        .unwrap()
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(got, [2, 3]);
    assert_eq!(s.get(id).await.unwrap().unwrap().output_lines, 3);
    // Many lines, in several batches, read back in pages with every byte kept.
    let mut seq = 3;
    for _ in 0..5 {
        let batch: Vec<Line> = (0..400)
            .map(|_| {
                seq += 1;
                let mut l = line(
                    seq,
                    &format!("line {seq} é\u{1F600} {}", "x".repeat(seq as usize % 97)),
                );
                // Every 7th line was not valid UTF-8: its bytes are kept beside the text.
                if seq.is_multiple_of(7) {
                    l.raw = Some(Arc::from(raw_bytes(seq)));
                }
                l
            })
            .collect();
        s.append_output(id, batch).await.unwrap();
    }
    let mut after = 0;
    let mut all = Vec::new();
    loop {
        let page = s.read_output(id, after, 333).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 333);
        after = page.last().unwrap().seq;
        all.extend(page);
    }
    assert_eq!(all.len(), 2003);
    for (i, l) in all.iter().enumerate() {
        assert_eq!(l.seq, i as u64 + 1);
        if l.seq > 3 {
            assert!(l.text.starts_with(&format!("line {} é\u{1F600} ", l.seq)));
            assert_eq!(l.text.matches('x').count(), l.seq as usize % 97);
        }
        let want = if l.seq.is_multiple_of(2) {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        assert_eq!(l.stream, want);
        let raw = (l.seq > 3 && l.seq.is_multiple_of(7)).then(|| raw_bytes(l.seq));
        assert_eq!(l.raw.as_deref(), raw.as_deref(), "seq {}", l.seq);
    }
    assert_eq!(s.get(id).await.unwrap().unwrap().output_lines, 2003);
}

async fn a_run_ends_with_its_last_output_in_one_write(s: &dyn RunStore) {
    let id = running_with_two_lines(s).await;
    // The last batch overlaps what a flush stored just before (a retried end).
    let t = SystemTime::now();
    let ok = Outcome::Exited(crate::run::Exit::Code(0));
    s.finish(
        id,
        vec![line(2, "l2"), line(3, "l3")],
        Expect::Active,
        finished(true, t, ok.clone()),
    )
    .await
    .unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.status(), RunStatus::Succeeded);
    assert_eq!(got.exit_code(), Some(0));
    assert_eq!(got.output_lines, 3);
    let text: Vec<String> = s
        .read_output(id, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|l| format!("{}:{}", l.seq, l.text))
        .collect();
    assert_eq!(text, ["1:l1", "2:l2", "3:l3"]);
    // An end is written once: a second is refused and changes nothing (a shared store
    // refuses it as a fence: the run is no longer held here).
    let err = s
        .finish(
            id,
            vec![line(4, "late")],
            Expect::Active,
            finished(true, t, Outcome::Lost),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::WrongState(r) if r.status() == RunStatus::Succeeded)
            || matches!(err, StoreError::Fenced(_)),
        "{err:?}"
    );
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.status(), RunStatus::Succeeded);
    assert_eq!(got.output_lines, 3);
    assert_eq!(s.read_output(id, 3, 10).await.unwrap().len(), 0);

    // A run with no output left to write ends the same way.
    let r = run("b", running());
    let id = r.id;
    s.create(new(r, None)).await.unwrap();
    s.finish(id, Vec::new(), Expect::Running, finished(true, t, ok))
        .await
        .unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.status(), RunStatus::Succeeded);
    assert_eq!(got.output_lines, 0);
    assert!(s.read_output(id, 0, 10).await.unwrap().is_empty());
}

/// Bytes that are not UTF-8 (NUL, a lone continuation byte, 0xFF), different per line.
fn raw_bytes(seq: u64) -> Vec<u8> {
    let mut b = format!("raw {seq} ").into_bytes();
    b.extend_from_slice(&[0, 0x80, 0xff, (seq % 251) as u8]);
    b
}

async fn idempotency_keys_give_one_run(s: &dyn RunStore) {
    let first = run("a", RunState::Queued);
    let id = first.id;
    assert!(matches!(
        s.create(new(first, Some(("k", 7)))).await.unwrap(),
        Created::New(_)
    ));
    match s
        .create(new(run("a", RunState::Queued), Some(("k", 7))))
        .await
        .unwrap()
    {
        Created::Existing(r) => assert_eq!(r.id, id),
        Created::New(_) => panic!("a second run for the same key"),
    }
    let err = s
        .create(new(run("a", RunState::Queued), Some(("k", 8))))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyConflict), "{err:?}");
    let key = IdempotencyKey {
        key: "k".into(),
        fingerprint: 7,
    };
    assert_eq!(s.find_idempotent(&key).await.unwrap().unwrap().id, id);
}

async fn purge_by_count_and_age_keeps_active_runs(s: &dyn RunStore) {
    let now = SystemTime::now();
    let mut ids = vec![];
    for i in 0..5 {
        let r = run("a", RunState::Queued);
        ids.push(r.id);
        s.create(new(r, Some((&format!("k{i}"), 1)))).await.unwrap();
    }
    // ids[0] stays queued; the others finished 40, 30, 20, 10 s ago.
    for (i, id) in ids[1..].iter().enumerate() {
        let t = now - Duration::from_secs(40 - 10 * i as u64);
        s.transition(*id, Expect::Active, finished(false, t, Outcome::Lost))
            .await
            .unwrap();
    }
    let policy = Retention {
        keep_runs: 3,
        keep_for: Duration::from_secs(25),
    };
    assert_eq!(s.purge(policy, now).await.unwrap(), 2);
    assert!(s.get(ids[0]).await.unwrap().is_some(), "active runs stay");
    assert!(s.get(ids[1]).await.unwrap().is_none());
    assert!(s.get(ids[2]).await.unwrap().is_none());
    assert!(s.get(ids[3]).await.unwrap().is_some());
    // Its output went with it (an engine may say the run is not found, or that it has none).
    match s.read_output(ids[1], 0, 10).await {
        Ok(lines) => assert!(lines.is_empty()),
        Err(e) => assert!(matches!(e, StoreError::NotFound(_)), "{e:?}"),
    }
    let k1 = IdempotencyKey {
        key: "k1".into(),
        fingerprint: 9,
    };
    assert!(
        s.find_idempotent(&k1).await.unwrap().is_none(),
        "keys go too"
    );
}

/// Retention goes by when runs finished, not when they were created, and a purged run no
/// longer counts.
async fn purge_takes_the_oldest_finished_whatever_the_creation_order(s: &dyn RunStore) {
    let now = SystemTime::now();
    let mut ids = vec![];
    for _ in 0..4 {
        let r = run("a", RunState::Queued);
        ids.push(r.id);
        s.create(new(r, None)).await.unwrap();
    }
    // Created 0, 1, 2, 3; finished 3 (oldest), 1, 0, 2 (newest).
    for (id, ago) in [(ids[3], 40), (ids[1], 30), (ids[0], 20), (ids[2], 10)] {
        let t = now - Duration::from_secs(ago);
        s.transition(id, Expect::Active, finished(true, t, Outcome::Lost))
            .await
            .unwrap();
    }
    let keep = |n| Retention {
        keep_runs: n,
        keep_for: Duration::from_secs(3600),
    };
    assert_eq!(s.purge(keep(4), now).await.unwrap(), 0);
    assert_eq!(s.purge(keep(2), now).await.unwrap(), 2);
    assert!(s.get(ids[3]).await.unwrap().is_none());
    assert!(s.get(ids[1]).await.unwrap().is_none());
    assert!(s.get(ids[0]).await.unwrap().is_some());
    assert!(s.get(ids[2]).await.unwrap().is_some());
    assert_eq!(s.purge(keep(2), now).await.unwrap(), 0, "nothing more");
    assert_eq!(s.purge(keep(1), now).await.unwrap(), 1);
    assert!(s.get(ids[0]).await.unwrap().is_none());
    assert!(s.get(ids[2]).await.unwrap().is_some());
}

async fn listing_pages_newest_first_with_filters(s: &dyn RunStore) {
    let mut ids = vec![];
    for i in 0..7 {
        let r = run(if i % 2 == 0 { "even" } else { "odd" }, RunState::Queued);
        ids.push(r.id);
        s.create(new(r, None)).await.unwrap();
    }
    let q = |before, module: Option<&str>, limit| ListQuery {
        statuses: None,
        module_id: module.map(String::from),
        before,
        limit,
        modules: None,
    };
    let p1 = s.list(q(None, None, 2)).await.unwrap();
    let p1_ids: Vec<RunId> = p1.runs.iter().map(|r| r.id).collect();
    assert_eq!(p1_ids, [ids[6], ids[5]]);
    let p2 = s.list(q(p1.next_cursor, None, 2)).await.unwrap();
    let p2_ids: Vec<RunId> = p2.runs.iter().map(|r| r.id).collect();
    assert_eq!(p2_ids, [ids[4], ids[3]]);
    let odd = s.list(q(None, Some("odd"), 10)).await.unwrap();
    assert_eq!(odd.runs.len(), 3);
    assert!(odd.next_cursor.is_none());
    let last = s.list(q(Some(ids[1]), None, 1)).await.unwrap();
    assert_eq!(last.runs[0].id, ids[0]);
    assert!(last.next_cursor.is_none());
    let pattern = |p: &str| Some(vec![crate::auth::ModulePattern::new(p).unwrap()]);
    let seen = s
        .list(ListQuery {
            modules: pattern("o*"),
            ..q(None, None, 10)
        })
        .await
        .unwrap();
    assert_eq!(seen.runs.len(), 3);
    let none = s
        .list(ListQuery {
            modules: Some(vec![]),
            ..q(None, None, 10)
        })
        .await
        .unwrap();
    assert!(none.runs.is_empty());
    let queued = s
        .list(ListQuery {
            statuses: Some(vec![RunStatus::Queued]),
            ..q(None, None, 10)
        })
        .await
        .unwrap();
    assert_eq!(queued.runs.len(), 7);
    let done = s
        .list(ListQuery {
            statuses: Some(vec![RunStatus::Succeeded]),
            ..q(None, None, 10)
        })
        .await
        .unwrap();
    assert!(done.runs.is_empty());
}

/// A run's final status brings one pending delivery per callback URL (with stable ids, in URL
/// order), also for a queued run that never started; a claim holds a delivery until its hold
/// lapses; a retry comes back when due; a result is recorded once; the run's end without URLs
/// brings none.
async fn a_final_status_brings_its_deliveries(s: &dyn RunStore) {
    let mut r = run("hooked", running());
    r.callbacks = vec!["http://a.test/1".into(), "http://b.test/2".into()];
    let id = r.id;
    s.create(new(r, None)).await.unwrap();
    assert_eq!(s.get(id).await.unwrap().unwrap().callbacks.len(), 2);
    let now = SystemTime::now();
    let hold = Duration::from_secs(60);
    assert!(s.claim_deliveries(now, hold, 10).await.unwrap().is_empty());
    assert!(s.deliveries(id).await.unwrap().is_empty());
    let exit = Outcome::Exited(crate::run::Exit::Code(0));
    s.transition(id, Expect::Running, finished(true, now, exit))
        .await
        .unwrap();
    let plain = run("plain", running());
    let plain_id = plain.id;
    s.create(new(plain, None)).await.unwrap();
    s.transition(
        plain_id,
        Expect::Running,
        finished(true, now, Outcome::Lost),
    )
    .await
    .unwrap();

    let states = s.deliveries(id).await.unwrap();
    let hex = id.as_uuid().simple().to_string();
    let ids: Vec<&str> = states.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, [format!("msg_{hex}_1"), format!("msg_{hex}_2")]);
    assert!(states.iter().all(|d| d.status == DeliveryStatus::Pending));
    assert_eq!(states[1].url, "http://b.test/2");

    let later = SystemTime::now() + Duration::from_millis(10);
    let due = s.claim_deliveries(later, hold, 10).await.unwrap();
    assert_eq!(due.len(), 2, "{due:?}");
    assert!(due.iter().all(|d| d.run_id == id && d.attempts == 0));
    // Held: not handed out again until the hold lapses.
    assert!(
        s.claim_deliveries(later, hold, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let first = due.iter().find(|d| d.url == "http://a.test/1").unwrap();
    let second = due.iter().find(|d| d.url == "http://b.test/2").unwrap();
    s.record_delivery(
        first.id.clone(),
        DeliveryResult::Retry {
            next_at: later,
            status: Some(500),
            error: "answered 500".into(),
        },
    )
    .await
    .unwrap();
    s.record_delivery(second.id.clone(), DeliveryResult::Delivered { status: 204 })
        .await
        .unwrap();
    let again = s.claim_deliveries(later, hold, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, first.id);
    assert_eq!(again[0].attempts, 1);
    s.record_delivery(
        first.id.clone(),
        DeliveryResult::Failed {
            status: None,
            error: "no answer".into(),
        },
    )
    .await
    .unwrap();
    // A late report of a finished delivery changes nothing.
    s.record_delivery(
        second.id.clone(),
        DeliveryResult::Failed {
            status: None,
            error: "late".into(),
        },
    )
    .await
    .unwrap();
    let states = s.deliveries(id).await.unwrap();
    assert_eq!(states[0].status, DeliveryStatus::Failed);
    assert_eq!(states[0].attempts, 2);
    assert_eq!(states[0].last_error.as_deref(), Some("no answer"));
    assert_eq!(states[1].status, DeliveryStatus::Delivered);
    assert_eq!(states[1].last_status, Some(204));
    assert!(states[1].done_at.is_some());
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert!(s.claim_deliveries(far, hold, 10).await.unwrap().is_empty());

    // A queued run cancelled before it started also tells its URLs.
    let mut q = run("hooked", RunState::Queued);
    q.callbacks = vec!["http://c.test/".into()];
    let qid = q.id;
    s.create(new(q, None)).await.unwrap();
    let cancelled = Outcome::Cancelled {
        reason: CancelReason::Request,
        exit: None,
        by: None,
    };
    s.transition(
        qid,
        Expect::Active,
        finished(false, SystemTime::now(), cancelled),
    )
    .await
    .unwrap();
    let states = s.deliveries(qid).await.unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].status, DeliveryStatus::Pending);
    assert!(s.deliveries(plain_id).await.unwrap().is_empty());
}

async fn a_cancel_request_is_noted_once_and_kept(s: &dyn RunStore) {
    let r = run("a", running());
    let id = r.id;
    s.create(new(r, None)).await.unwrap();
    assert_eq!(s.get(id).await.unwrap().unwrap().cancel_requested_at, None);
    // Whole microseconds: what every engine keeps.
    let first = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    s.cancel_requested(id, first).await.unwrap();
    s.cancel_requested(id, first + Duration::from_secs(5))
        .await
        .unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.cancel_requested_at, Some(first));
    assert_eq!(got.status(), RunStatus::Running);
    let cancelled = Outcome::Cancelled {
        reason: CancelReason::Request,
        exit: None,
        by: None,
    };
    s.transition(
        id,
        Expect::Running,
        finished(true, SystemTime::now(), cancelled),
    )
    .await
    .unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.status(), RunStatus::Cancelled);
    assert_eq!(got.cancel_requested_at, Some(first), "kept after the end");
    // Not running: nothing to note.
    let q = run("a", RunState::Queued);
    let qid = q.id;
    s.create(new(q, None)).await.unwrap();
    s.cancel_requested(qid, first).await.unwrap();
    assert_eq!(s.get(qid).await.unwrap().unwrap().cancel_requested_at, None);
}
