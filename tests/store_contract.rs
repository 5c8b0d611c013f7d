//! The storage seam's contract, held by both backends: one list of checks
//! run against the embedded sled store and against a real 3-member etcd
//! cluster, both opened through `store::open` as the vault opens them.
//!
//! What only one engine has (sled's crash recovery of a cut-off event,
//! etcd's claims and watch) is tested beside that engine; what every
//! `CredentialStore` must do is stated once, here, so the two cannot drift.

mod support;

use std::{sync::Arc, time::Duration};

use credvault::store::{
    self, CasOutcome, ClaimOutcome, CredentialStore, EtcdSettings, EventCursor, NewEvent, Revision,
    StoreKey, StoreSettings, Write,
};
use support::etcd::EtcdCluster;

#[tokio::test]
async fn the_embedded_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let settings = StoreSettings::Embedded {
        data_dir: dir.path().to_path_buf(),
        cache_capacity: 8 << 20,
    };
    keeps_the_store_contract(&settings).await;
}

#[tokio::test]
async fn the_etcd_store_keeps_the_store_contract() {
    let cluster = EtcdCluster::start(3);
    keeps_the_store_contract(&etcd_settings(&cluster, b"/contract/")).await;
}

fn etcd_settings(cluster: &EtcdCluster, prefix: &[u8]) -> StoreSettings {
    StoreSettings::Replicated(EtcdSettings {
        endpoints: cluster.endpoints(),
        prefix: prefix.to_vec(),
        dial_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        max_staleness: Duration::from_secs(1),
        claim_takeover: Duration::from_secs(5),
        ca: None,
        cert: None,
        key: None,
    })
}

/// Etcd only: a member that dies while calls are out on it. The key guard's
/// put-if-absent is a replica's first write, and one call failed in the
/// transport failed the replica's start (seen in CI). The calls go out
/// together, so several meet the dead member before it is benched; each
/// must land once, on another member.
#[tokio::test]
async fn the_etcd_store_rides_out_a_dead_follower_under_put_if_absent() {
    let mut cluster = EtcdCluster::start(3);
    let store = store::open(&etcd_settings(&cluster, b"/dead-follower/"))
        .await
        .unwrap();
    // A connection open to every member, as on a replica that has served.
    for _ in 0..6 {
        store.get_meta("warm-up").await.unwrap();
    }
    let leader = cluster.leader().expect("the cluster has a leader");
    // A follower: the leader's death would add an election, which is
    // `swap`'s patience to ride, not this test's.
    cluster.kill((leader + 1) % 3);

    // Zero-padded, so the names' order is the store's.
    let expected: Vec<(String, Vec<u8>)> =
        (0u8..12).map(|i| (format!("fp/{i:02}"), vec![i])).collect();
    let outcomes = futures::future::join_all(
        expected
            .iter()
            .map(|(name, value)| store.put_meta_if_absent(name, value.clone())),
    )
    .await;
    for ((name, _), outcome) in expected.iter().zip(outcomes) {
        assert_eq!(
            outcome.unwrap_or_else(|e| panic!("put-if-absent of {name} failed: {e}")),
            None,
            "{name} was written by this call"
        );
    }
    let mut meta = store.all_meta().await.unwrap();
    meta.sort();
    assert_eq!(meta, expected, "each value landed once, as written");
}

/// Etcd only: a member that freezes (SIGSTOP: its connections stay open,
/// it answers nothing) costs the calls sent to it before anyone could know,
/// and then one call per stall (a fifth of the request timeout), its probe.
/// Before, it kept its turn until the first of them timed out, so for a
/// whole request timeout every third call waited one out. A follower
/// first, then the leader, whose freeze adds an election. No read, write
/// or refresh claim fails either: one that meets the frozen member, or that
/// a healthy member forwarded to the frozen leader, is sent again to
/// another.
#[tokio::test]
async fn a_frozen_etcd_member_stops_getting_calls_before_the_first_times_out() {
    // A read, a write and a claim every 50 ms for 4 s.
    const CALLS: u32 = 240;
    let cluster = EtcdCluster::start(3);
    let leader = cluster.leader().expect("the cluster has a leader");
    let follower = (leader + 1) % 3;
    // The watch's silence benches the member that carries it after half
    // of `max_staleness`; a long one leaves the frozen member to the
    // transport alone, whichever member the watch is on.
    let mut settings = etcd_settings(&cluster, b"/frozen/");
    if let StoreSettings::Replicated(etcd) = &mut settings {
        etcd.max_staleness = Duration::from_secs(20);
    }
    // Calls started this long after the freeze meet the member only as its
    // probes, 600 ms apart: past the stall that marks it (a fifth of the
    // 3 s request timeout) and, for the leader, the election (500 ms
    // timeout here), with room for a loaded host. The others must answer
    // well within the request timeout.
    for (member, role, unaffected_after) in [
        (follower, "follower", Duration::from_millis(1500)),
        (leader, "leader", Duration::from_millis(2500)),
    ] {
        let store = store::open(&settings).await.unwrap();
        // A connection open to every member, as on a replica that has served.
        for _ in 0..6 {
            store.get_meta("probe").await.unwrap();
        }
        cluster.freeze(member, true);
        let frozen_at = tokio::time::Instant::now();
        // Open loop: a read, a write (a record with its event, as a Deposit
        // writes) and a refresh claim every 50 ms for 4 s, each timed on
        // its own. Each claim is on a key no one has claimed: anything but
        // `Won` fails, a claim whose lost reply had landed among them.
        let calls: Vec<_> = (0u32..CALLS)
            .map(|n| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    tokio::time::sleep_until(frozen_at + Duration::from_millis(50) * (n / 3)).await;
                    let started = tokio::time::Instant::now();
                    let key = StoreKey::new("acme", &format!("{role}-{n}"), "google");
                    let error = match n % 3 {
                        0 => store.get_meta("probe").await.err().map(|e| e.to_string()),
                        1 => {
                            let write = Write {
                                value: Some(vec![7; 200]),
                                event: Some(event(1)),
                                ..Write::DURABLE
                            };
                            store.write(&key, write).await.err().map(|e| e.to_string())
                        }
                        _ => match store.claim(&key).await {
                            Ok(ClaimOutcome::Won(Some(_))) => None,
                            other => Some(format!("claim: {other:?}")),
                        },
                    };
                    (started - frozen_at, started.elapsed(), error)
                })
            })
            .collect();
        let (mut slow, mut failed) = (Vec::new(), Vec::new());
        for call in calls {
            let (started, took, error) = call.await.unwrap();
            if let Some(error) = error {
                failed.push((started, took, error));
            } else if started >= unaffected_after && took > Duration::from_secs(1) {
                slow.push((started, took));
            }
        }
        cluster.freeze(member, false);
        println!(
            "{role} frozen: {} of {CALLS} calls failed; after {unaffected_after:?}, these waited (started, took): {slow:?}",
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "with the {role} frozen, calls failed (started, took, error): {failed:?}"
        );
        // Probes only: on the 50 ms grid, at least 600 ms apart.
        let probe_spacing = Duration::from_millis(550);
        assert!(
            slow.windows(2)
                .all(|pair| pair[1].0 - pair[0].0 >= probe_spacing),
            "with the {role} frozen, calls started after {unaffected_after:?} \
             waited on it more often than its probes (started, took): {slow:?}"
        );
        cluster.wait_member_healthy(member, Duration::from_secs(20));
    }
}

/// Every check, in order, on one fresh store; the last ones reopen it.
async fn keeps_the_store_contract(settings: &StoreSettings) {
    let store = store::open(settings).await.unwrap();
    let key = StoreKey::new("acme", "alice", "google");

    let (r1, r2) = compare_and_swap_creates_updates_and_detects_conflicts(&store, &key).await;
    scans_are_scoped_to_a_tenant_in_key_order_and_page(&store).await;
    deletes_and_bookkeeping(&store, &key, r2).await;
    // Revisions start above zero (zero is no revision on either engine).
    assert!(Revision(0) < r1);

    let logged = a_write_and_its_event_land_together(&store).await;

    // What was acknowledged is there after a reopen, revision and all, and
    // the log's positions go on from where they were.
    let kept = StoreKey::new("acme", "b", "p");
    let before = store.get(&kept).await.unwrap().unwrap();
    drop(store);
    let store = store::open(settings).await.unwrap();
    assert_eq!(store.get(&kept).await.unwrap().as_ref(), Some(&before));
    let write = Write {
        value: Some(b"after reopen".to_vec()),
        event: Some(event(4)),
        ..Write::DURABLE
    };
    let events_key = StoreKey::new("acme", "events", "google");
    assert!(matches!(
        store.write(&events_key, write).await.unwrap(),
        CasOutcome::Written(Some(_))
    ));
    let after = store.events_after(&logged.cursor, 10).await.unwrap();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].payload, vec![4]);
    assert!(after[0].cursor.position > logged.cursor.position);
}

fn event(n: u8) -> NewEvent {
    NewEvent {
        at_ms: 1_000 + u64::from(n),
        payload: vec![n],
    }
}

/// Returns the revisions of the create and of the update.
async fn compare_and_swap_creates_updates_and_detects_conflicts(
    store: &Arc<dyn CredentialStore>,
    key: &StoreKey,
) -> (Revision, Revision) {
    let CasOutcome::Written(Some(r1)) = store
        .compare_and_swap(key, None, Some(b"one".to_vec()))
        .await
        .unwrap()
    else {
        panic!("create must succeed");
    };
    // Creating again conflicts, and shows what is stored.
    let again = store
        .compare_and_swap(key, None, Some(b"dup".to_vec()))
        .await
        .unwrap();
    assert!(matches!(again, CasOutcome::Conflict(Some(ref v)) if v.value == b"one"));

    let CasOutcome::Written(Some(r2)) = store
        .compare_and_swap(key, Some(r1), Some(b"two".to_vec()))
        .await
        .unwrap()
    else {
        panic!("update at the read revision must succeed");
    };
    assert!(r2 > r1);

    // A writer still holding r1 loses, and sees the newer revision.
    let stale = store
        .compare_and_swap(key, Some(r1), Some(b"stale".to_vec()))
        .await
        .unwrap();
    assert!(matches!(stale, CasOutcome::Conflict(Some(ref v)) if v.revision == r2));
    let stored = store.get(key).await.unwrap().unwrap();
    assert_eq!(
        (stored.value.as_slice(), stored.revision),
        (&b"two"[..], r2)
    );
    (r1, r2)
}

async fn scans_are_scoped_to_a_tenant_in_key_order_and_page(store: &Arc<dyn CredentialStore>) {
    for (tenant, subject) in [("acme", "c"), ("acmex", "a"), ("acme", "b")] {
        store
            .compare_and_swap(&StoreKey::new(tenant, subject, "p"), None, Some(vec![1]))
            .await
            .unwrap();
    }
    // With `acme/alice/google` from before: three records of `acme`, in the
    // order of their keys' bytes (which is not the subjects' order: a key
    // spells each part's length before it).
    let mut expected: Vec<StoreKey> = ["alice", "b", "c"]
        .into_iter()
        .map(|subject| {
            StoreKey::new(
                "acme",
                subject,
                if subject == "alice" { "google" } else { "p" },
            )
        })
        .collect();
    expected.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let prefix = StoreKey::tenant_prefix("acme");
    let page1 = store.scan(&prefix, None, 2).await.unwrap();
    let keys = |page: &[(StoreKey, credvault::store::Versioned)]| -> Vec<StoreKey> {
        page.iter().map(|(key, _)| key.clone()).collect()
    };
    assert_eq!(keys(&page1), expected[..2]);
    let page2 = store.scan(&prefix, Some(&page1[1].0), 10).await.unwrap();
    assert_eq!(
        keys(&page2),
        expected[2..],
        "the tenant `acmex` must not leak into `acme`"
    );
    assert_eq!(store.count_after(None).await.unwrap(), 4);
    assert_eq!(
        store.count_after(Some(page1[1].0.clone())).await.unwrap(),
        2
    );
}

async fn deletes_and_bookkeeping(
    store: &Arc<dyn CredentialStore>,
    key: &StoreKey,
    current: Revision,
) {
    assert_eq!(
        store
            .compare_and_swap(key, Some(current), None)
            .await
            .unwrap(),
        CasOutcome::Written(None)
    );
    assert_eq!(store.get(key).await.unwrap(), None);
    // Deleting what is gone conflicts rather than succeeding twice.
    assert_eq!(
        store
            .compare_and_swap(key, Some(current), None)
            .await
            .unwrap(),
        CasOutcome::Conflict(None)
    );

    store.put_meta("rewrap/cursor", vec![9]).await.unwrap();
    assert_eq!(
        store.get_meta("rewrap/cursor").await.unwrap(),
        Some(vec![9])
    );
    assert_eq!(
        store.put_meta_if_absent("fp/1", vec![1]).await.unwrap(),
        None
    );
    assert_eq!(
        store.put_meta_if_absent("fp/1", vec![2]).await.unwrap(),
        Some(vec![1])
    );
    let mut meta = store.all_meta().await.unwrap();
    meta.sort();
    assert_eq!(
        meta,
        [
            ("fp/1".to_string(), vec![1]),
            ("rewrap/cursor".to_string(), vec![9])
        ],
    );
}

/// An event is logged with its write or not at all, in write order, and
/// scans see records only. Returns the last event logged.
async fn a_write_and_its_event_land_together(
    store: &Arc<dyn CredentialStore>,
) -> credvault::store::LoggedEvent {
    let key = StoreKey::new("acme", "events", "google");
    let everything = StoreKey::from_bytes(Vec::new());
    let scanned_before = store.scan(&everything, None, 100).await.unwrap();
    let write = Write {
        value: Some(b"one".to_vec()),
        event: Some(event(1)),
        ..Write::DURABLE
    };
    let CasOutcome::Written(Some(r1)) = store.write(&key, write).await.unwrap() else {
        panic!("the create must succeed");
    };
    // A conflicting write logs nothing.
    let stale = Write {
        value: Some(b"stale".to_vec()),
        event: Some(event(2)),
        ..Write::DURABLE
    };
    assert!(matches!(
        store.write(&key, stale).await.unwrap(),
        CasOutcome::Conflict(_)
    ));
    let delete = Write {
        expected: Some(r1),
        event: Some(event(3)),
        ..Write::DURABLE
    };
    assert_eq!(
        store.write(&key, delete).await.unwrap(),
        CasOutcome::Written(None)
    );

    let logged = store
        .events_after(&EventCursor::default(), 10)
        .await
        .unwrap();
    let payloads: Vec<Vec<u8>> = logged.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(payloads, [vec![1], vec![3]]);
    assert!(logged[0].cursor < logged[1].cursor);
    assert_eq!(logged[0].cursor.at_ms, 1_001);
    // The horizon stands at or past the newest event (etcd's is the
    // cluster's revision, sled's the event itself); reading from it finds
    // none.
    let horizon = store.event_horizon().await.unwrap();
    assert!(horizon.head.position >= logged[1].cursor.position);
    assert!(store
        .events_after(&horizon.head, 10)
        .await
        .unwrap()
        .is_empty());
    // The log is no record: a scan of everything sees what it saw before.
    assert_eq!(
        store.scan(&everything, None, 100).await.unwrap(),
        scanned_before
    );
    logged[1].clone()
}
