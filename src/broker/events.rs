//! Credential events (DESIGN §5e): what happened to a credential, logged in
//! the same atomic store write as the change itself, and read back in log
//! order by watchers and webhook deliveries.
//!
//! A write notes its event (`Noted`); the write path stamps it with the
//! credential and the time and hands it to the store with the change, so
//! there is no change without its event and no event without its change.
//! Events carry references, causes and labels, never a token: the payload is
//! built from those fields only.
//!
//! [`Broker::watch`] reads the log from a cursor: history first, then live
//! events as the store signals them, a page at a time, so a watcher holds
//! one page of memory however far behind it is.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::Stream;
use prost::Message;

use super::{
    model::{CredentialId, CredentialRecord},
    Broker, BrokerError,
};
use crate::store::{EventCursor, LoggedEvent, NewEvent};

/// Events read from the store per round trip.
const PAGE: usize = 64;
/// How often an idle watcher re-reads the log even without a signal: a
/// replicated store's watch can break, and this bounds the delay it causes.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Settings of the event log.
#[derive(Clone, Debug)]
pub struct EventSettings {
    /// Log events at all (off: writes carry none; watchers see nothing new).
    pub enabled: bool,
    /// Events older than this are trimmed.
    pub retention: Duration,
    /// Transient refresh failures for this long give REFRESH_FAILING.
    pub failing_after: Duration,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: Duration::from_secs(7 * 24 * 3600),
            failing_after: Duration::from_secs(300),
        }
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    /// A Deposit (or a completed authorization).
    Deposited,
    /// The grant is dead; the cause says why.
    ReauthRequired,
    Revoked,
    /// Transient refresh failures for longer than the threshold.
    RefreshFailing,
    /// Refresh works again after REFRESH_FAILING.
    Recovered,
}

impl EventType {
    pub const ALL: [Self; 5] = [
        Self::Deposited,
        Self::ReauthRequired,
        Self::Revoked,
        Self::RefreshFailing,
        Self::Recovered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deposited => "DEPOSITED",
            Self::ReauthRequired => "REAUTH_REQUIRED",
            Self::Revoked => "REVOKED",
            Self::RefreshFailing => "REFRESH_FAILING",
            Self::Recovered => "RECOVERED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }

    fn code(self) -> u32 {
        match self {
            Self::Deposited => 1,
            Self::ReauthRequired => 2,
            Self::Revoked => 3,
            Self::RefreshFailing => 4,
            Self::Recovered => 5,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }
}

/// One event, as watchers and webhooks see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialEvent {
    /// Opaque, strictly increasing per vault; resume after it.
    pub cursor: String,
    pub kind: EventType,
    pub id: CredentialId,
    pub at: SystemTime,
    pub generation: u64,
    pub cause: String,
    pub labels: BTreeMap<String, String>,
}

/// What a write says happened; the write path adds who and when.
#[derive(Clone, Debug)]
pub(crate) struct Noted {
    pub kind: EventType,
    pub cause: String,
    pub generation: u64,
    pub labels: BTreeMap<String, String>,
}

impl Noted {
    /// `kind` happened to the credential that `record` now describes.
    pub fn of(kind: EventType, record: &CredentialRecord, cause: &str) -> Self {
        Self {
            kind,
            cause: cause.to_owned(),
            generation: record.generation,
            labels: record.labels.clone(),
        }
    }

    /// The event as the store logs it.
    pub fn logged(&self, id: &CredentialId, at: SystemTime) -> NewEvent {
        let at_ms = millis(at);
        let payload = EventPayload {
            kind: self.kind.code(),
            tenant: id.tenant.clone(),
            subject: id.subject.clone(),
            provider: id.provider.clone(),
            at_ms,
            generation: self.generation,
            cause: self.cause.clone(),
            labels: self.labels.clone(),
        };
        NewEvent {
            at_ms,
            payload: payload.encode_to_vec(),
        }
    }
}

/// The stored form of an event. Every field is non-secret by construction.
#[derive(Clone, PartialEq, Message)]
struct EventPayload {
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(string, tag = "2")]
    tenant: String,
    #[prost(string, tag = "3")]
    subject: String,
    #[prost(string, tag = "4")]
    provider: String,
    #[prost(uint64, tag = "5")]
    at_ms: u64,
    #[prost(uint64, tag = "6")]
    generation: u64,
    #[prost(string, tag = "7")]
    cause: String,
    #[prost(btree_map = "string, string", tag = "8")]
    labels: BTreeMap<String, String>,
}

fn decode(logged: LoggedEvent) -> Result<CredentialEvent, BrokerError> {
    let payload = EventPayload::decode(logged.payload.as_slice())
        .map_err(|_| BrokerError::RecordUnreadable("a logged event is not valid protobuf"))?;
    let kind = EventType::from_code(payload.kind).ok_or(BrokerError::RecordUnreadable(
        "a logged event has an unknown type",
    ))?;
    Ok(CredentialEvent {
        cursor: logged.cursor.encode(),
        kind,
        id: CredentialId {
            tenant: payload.tenant,
            subject: payload.subject,
            provider: payload.provider,
        },
        at: UNIX_EPOCH + Duration::from_millis(payload.at_ms),
        generation: payload.generation,
        cause: payload.cause,
        labels: payload.labels,
    })
}

pub(crate) fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Which events a watcher wants.
#[derive(Clone, Debug)]
pub struct EventFilter {
    /// `None`: every tenant.
    pub tenant: Option<String>,
    /// Empty: every type.
    pub types: BTreeSet<EventType>,
}

impl EventFilter {
    pub fn matches(&self, event: &CredentialEvent) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == event.id.tenant)
            && (self.types.is_empty() || self.types.contains(&event.kind))
    }
}

/// Where a watch starts.
#[derive(Clone, Debug)]
pub enum StartAt {
    /// Only events logged from now on.
    Now,
    /// Strictly after this cursor (as a client got it).
    After(String),
}

/// Where a watch is: what it read last and what it will read next.
struct Reader {
    broker: Arc<Broker>,
    filter: EventFilter,
    cursor: EventCursor,
    signal: tokio::sync::watch::Receiver<u64>,
    page: std::vec::IntoIter<LoggedEvent>,
}

impl Broker {
    /// Events matching `filter`, from `start` on: history first, then live
    /// events, in log order, without end. A cursor the log was trimmed past
    /// is refused up front (and ends the stream if a trim overtakes it).
    pub async fn watch(
        self: &Arc<Self>,
        filter: EventFilter,
        start: StartAt,
    ) -> Result<
        impl Stream<Item = Result<CredentialEvent, BrokerError>> + Send + 'static,
        BrokerError,
    > {
        // Subscribe before reading where the log stands: no event can land
        // between the two unseen.
        let signal = self.store.event_signal();
        let horizon = self.store.event_horizon().await?;
        let cursor = match start {
            StartAt::Now => horizon.head,
            StartAt::After(text) => {
                let cursor = EventCursor::decode(&text).ok_or(BrokerError::InvalidCursor)?;
                if cursor.position < horizon.trimmed_through {
                    return Err(BrokerError::CursorExpired);
                }
                cursor
            }
        };
        let reader = Reader {
            broker: Arc::clone(self),
            filter,
            cursor,
            signal,
            page: Vec::new().into_iter(),
        };
        Ok(futures::stream::try_unfold(
            reader,
            |mut reader| async move {
                let event = reader.next().await?;
                Ok(Some((event, reader)))
            },
        ))
    }

    /// Deletes events older than the retention; returns how many went.
    pub async fn trim_events(&self) -> Result<u64, BrokerError> {
        let cutoff = SystemTime::now()
            .checked_sub(self.settings.events.retention)
            .unwrap_or(UNIX_EPOCH);
        Ok(self.store.trim_events(millis(cutoff)).await?)
    }

    /// The cursor of the newest event: a reader starting there sees only
    /// what comes next.
    pub async fn events_head(&self) -> Result<String, BrokerError> {
        Ok(self.store.event_horizon().await?.head.encode())
    }

    pub fn event_settings(&self) -> &EventSettings {
        &self.settings.events
    }
}

impl Reader {
    /// The next matching event, waiting for one as long as it takes.
    async fn next(&mut self) -> Result<CredentialEvent, BrokerError> {
        loop {
            for logged in self.page.by_ref() {
                self.cursor = logged.cursor;
                let event = decode(logged)?;
                if self.filter.matches(&event) {
                    return Ok(event);
                }
            }
            let page = self.broker.store.events_after(&self.cursor, PAGE).await?;
            if page.is_empty() {
                // Mark the signal seen, then wait for the next one (or the
                // idle poll, which covers a replicated store's watch gap).
                self.signal.borrow_and_update();
                let _ = tokio::time::timeout(IDLE_POLL, self.signal.changed()).await;
                continue;
            }
            // History this reader had not reached yet may have been trimmed
            // meanwhile: then it has missed events and must say so.
            let horizon = self.broker.store.event_horizon().await?;
            if self.cursor.position < horizon.trimmed_through {
                return Err(BrokerError::CursorExpired);
            }
            self.page = page.into_iter();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_without_secrets() {
        let id = CredentialId {
            tenant: "acme".into(),
            subject: "alice".into(),
            provider: "google".into(),
        };
        let noted = Noted {
            kind: EventType::ReauthRequired,
            cause: "invalid_grant".into(),
            generation: 3,
            labels: [("team".to_string(), "core".to_string())].into(),
        };
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let logged = noted.logged(&id, at);
        let event = decode(LoggedEvent {
            cursor: EventCursor {
                position: 9,
                at_ms: logged.at_ms,
            },
            payload: logged.payload,
        })
        .unwrap();
        assert_eq!(event.kind, EventType::ReauthRequired);
        assert_eq!(event.id, id);
        assert_eq!(event.at, at);
        assert_eq!(event.generation, 3);
        assert_eq!(event.cause, "invalid_grant");
        assert_eq!(EventCursor::decode(&event.cursor).unwrap().position, 9);
    }

    #[test]
    fn garbage_events_are_errors_not_panics() {
        for payload in [&b"\xff\xff"[..], b"\x08\x63"] {
            let logged = LoggedEvent {
                cursor: EventCursor::default(),
                payload: payload.to_vec(),
            };
            assert!(decode(logged).is_err());
        }
    }

    #[test]
    fn cursors_order_as_strings_and_reject_garbage() {
        let a = EventCursor {
            position: 9,
            at_ms: 5,
        };
        let b = EventCursor {
            position: 10,
            at_ms: 1,
        };
        assert!(a.encode() < b.encode());
        assert_eq!(EventCursor::decode(&b.encode()), Some(b));
        for bad in [
            "",
            "xyz",
            &"0".repeat(31),
            &"g".repeat(32),
            "é".repeat(16).as_str(),
        ] {
            assert_eq!(EventCursor::decode(bad), None, "{bad:?}");
        }
    }
}
