//! `WatchCredentialEvents`: admitting a watch (tenant scope, cursor, types)
//! and pumping the broker's event stream onto the wire with bounded memory.
//!
//! Each stream gets one task and a channel of `buffer` events on top of
//! HTTP/2 flow control. A reader that takes nothing for `stall` while an
//! event waits is ended with `CONSUMER_TOO_SLOW` (after what is buffered),
//! so a stream that never reads holds a fixed amount of memory and then
//! none. A client that hangs up ends its task at once; so does shutdown,
//! with UNAVAILABLE, so clients resume on another replica.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::{
    pb,
    status::{ApiError, FieldViolation},
};
use crate::{
    auth::{Action, Caller, Principal},
    broker::{
        events::{CredentialEvent, EventFilter, EventType, StartAt},
        BrokerError,
    },
};

/// The longest cursor accepted (they are 32 characters).
const MAX_CURSOR: usize = 64;

/// The response stream of one watch.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::CredentialEvent, Status>> + Send>>;

/// How watch streams are bounded.
#[derive(Clone)]
pub struct Watching {
    /// Events buffered per stream.
    pub buffer: usize,
    /// How long an event may wait for a reader before the stream ends.
    pub stall: Duration,
    /// Streams open at once, process-wide.
    pub streams: Arc<Semaphore>,
    /// Becomes true when the server begins to shut down.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// What a watch asks for, validated and scoped to the caller.
pub struct Watch {
    pub filter: EventFilter,
    pub start: StartAt,
}

/// Validates a watch and scopes it: one tenant of the caller's, or `*`
/// with a grant for every tenant.
pub fn admit(
    request: pb::WatchCredentialEventsRequest,
    principal: &Principal,
) -> Result<(Caller, Watch), ApiError> {
    let mut violations = Vec::new();
    if request.after.len() > MAX_CURSOR {
        violations.push(FieldViolation::new(
            "after",
            format!("at most {MAX_CURSOR} bytes"),
        ));
    }
    let mut types = std::collections::BTreeSet::new();
    for raw in &request.types {
        match pb::CredentialEventType::try_from(*raw)
            .ok()
            .and_then(event_type)
        {
            Some(kind) => {
                types.insert(kind);
            }
            None => violations.push(FieldViolation::new(
                "types",
                format!("{raw} is not a credential event type"),
            )),
        }
    }
    if !violations.is_empty() {
        return Err(ApiError::InvalidFields(violations));
    }
    let (caller, tenant) = if request.tenant == "*" {
        (principal.authorize_global(Action::Watch)?, None)
    } else {
        let caller = principal.authorize(&request.tenant, Action::Watch)?;
        let tenant = caller.tenant.clone();
        (caller, Some(tenant))
    };
    let start = match request.after.as_str() {
        "" => StartAt::Now,
        after => StartAt::After(after.to_owned()),
    };
    Ok((
        caller,
        Watch {
            filter: EventFilter { tenant, types },
            start,
        },
    ))
}

impl Watching {
    /// A place for one more stream, or OVERLOADED.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.streams)
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded("too many event streams open"))
    }

    /// Pumps `events` to the wire (see the module documentation).
    pub fn pump(
        &self,
        events: impl Stream<Item = Result<CredentialEvent, BrokerError>> + Send + 'static,
        permit: OwnedSemaphorePermit,
    ) -> EventStream {
        let (tx, rx) = mpsc::channel(self.buffer.max(1));
        let ended: Arc<Mutex<Option<Status>>> = Arc::default();
        let end = Arc::clone(&ended);
        let stall = self.stall;
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut events = std::pin::pin!(events);
            let finish = |status: Status| {
                *end.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
            };
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    () = tx.closed() => return,
                    _ = stopping.wait_for(|stop| *stop) => {
                        return finish(ApiError::ShuttingDown.into());
                    }
                };
                let item = match next {
                    Some(Ok(event)) => event_proto(event),
                    Some(Err(error)) => return finish(ApiError::from(error).wire().into_status()),
                    None => return,
                };
                match tx.send_timeout(Ok(item), stall).await {
                    Ok(()) => {}
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                        return finish(ApiError::ConsumerTooSlow.wire().into_status());
                    }
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
                }
            }
        });
        // What was buffered first, then how the stream ended, if typed.
        let events = tokio_stream::wrappers::ReceiverStream::new(rx);
        let last =
            futures::stream::once(
                async move { ended.lock().unwrap_or_else(|e| e.into_inner()).take() },
            )
            .filter_map(|status| async move { status.map(Err) });
        Box::pin(events.chain(last))
    }
}

fn event_type(kind: pb::CredentialEventType) -> Option<EventType> {
    Some(match kind {
        pb::CredentialEventType::Unspecified => return None,
        pb::CredentialEventType::Deposited => EventType::Deposited,
        pb::CredentialEventType::ReauthRequired => EventType::ReauthRequired,
        pb::CredentialEventType::Revoked => EventType::Revoked,
        pb::CredentialEventType::RefreshFailing => EventType::RefreshFailing,
        pb::CredentialEventType::Recovered => EventType::Recovered,
    })
}

fn wire_type(kind: EventType) -> pb::CredentialEventType {
    match kind {
        EventType::Deposited => pb::CredentialEventType::Deposited,
        EventType::ReauthRequired => pb::CredentialEventType::ReauthRequired,
        EventType::Revoked => pb::CredentialEventType::Revoked,
        EventType::RefreshFailing => pb::CredentialEventType::RefreshFailing,
        EventType::Recovered => pb::CredentialEventType::Recovered,
    }
}

fn event_proto(event: CredentialEvent) -> pb::CredentialEvent {
    pb::CredentialEvent {
        cursor: event.cursor,
        r#type: wire_type(event.kind) as i32,
        credential: Some(super::convert::credential_ref(event.id)),
        at: Some(prost_types::Timestamp::from(event.at)),
        generation: event.generation,
        cause: event.cause,
        labels: event.labels.into_iter().collect(),
    }
}
