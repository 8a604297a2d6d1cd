//! The queue on NATS JetStream: the distributed mode.
//!
//! Topology, created idempotently by [`JetStreamQueue::ensure_topology`]:
//! - one stream per campaign, `PANSCREEN_<CAMPAIGN>`, over `panscreen.<campaign>.>`:
//!   work-queue retention (a message is gone once acked), file storage, configurable
//!   replicas, and a duplicate window in which a repeated `Nats-Msg-Id` is dropped;
//! - one durable pull consumer per subject and consumer name, explicit ack, with
//!   `ack_wait`, `max_deliver`, `backoff` and `max_ack_pending` chosen in
//!   [`JetStreamSettings`].
//!
//! Every publish waits for the server's ack. A delivery's attempt is JetStream's
//! delivered count. Acks are double acks: the server confirms them.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::{ConnectOptions, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{Delivery, Published, Queue, QueueError, Settle, Settlement, Subscription};

/// How to reach NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsConfig {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<std::path::PathBuf>,
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Stream and consumer settings, chosen on purpose.
#[derive(Debug, Clone)]
pub struct JetStreamSettings {
    pub replicas: usize,
    /// A repeated `Nats-Msg-Id` within this window is dropped.
    pub duplicate_window: Duration,
    /// Redelivery when a message is neither acked nor in progress for this long.
    pub ack_wait: Duration,
    /// Server-side delivery limit. The worker quarantines at its own limit; this one
    /// is higher, so a worker that died on the last attempt still gets to quarantine.
    pub max_deliver: i64,
    /// Server-side redelivery delays after an ack wait runs out.
    pub backoff: Vec<Duration>,
    /// Messages out for a consumer at once, across all its workers.
    pub max_ack_pending: i64,
}

impl Default for JetStreamSettings {
    fn default() -> Self {
        JetStreamSettings {
            replicas: 1,
            duplicate_window: Duration::from_secs(24 * 3600),
            ack_wait: Duration::from_secs(60),
            max_deliver: 8,
            backoff: Vec::new(),
            max_ack_pending: 64,
        }
    }
}

/// Messages waiting for one consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Backlog {
    /// Not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acked.
    pub in_flight: u64,
    /// Delivered more than once and not yet acked.
    pub redelivered: u64,
    /// 1 when the durable consumer exists.
    pub consumers: u32,
}

pub struct JetStreamQueue {
    context: jetstream::Context,
    stream_name: String,
    campaign: String,
    settings: JetStreamSettings,
}

fn unavailable(error: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(error.to_string())
}

/// Stream name for a campaign: upper case, no dots or spaces.
pub fn stream_name(campaign: &str) -> String {
    let cleaned: String = campaign
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    format!("PANSCREEN_{}", cleaned.to_uppercase())
}

/// Durable consumer name for a subject: the consumer name plus the subject's last token.
pub fn consumer_name(consumer: &str, subject: &str) -> String {
    let last = subject.rsplit('.').next().unwrap_or(subject);
    format!("{consumer}-{last}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect()
}

impl JetStreamQueue {
    /// Connects and makes sure the campaign's stream exists.
    pub async fn connect(
        nats: &NatsConfig,
        campaign: &str,
        settings: JetStreamSettings,
    ) -> Result<Self, QueueError> {
        let queue = Self::connect_existing(nats, campaign, settings).await?;
        queue.ensure_topology().await?;
        Ok(queue)
    }

    /// Connects without creating anything (read-only commands such as `status`).
    pub async fn connect_existing(
        nats: &NatsConfig,
        campaign: &str,
        settings: JetStreamSettings,
    ) -> Result<Self, QueueError> {
        let mut options = ConnectOptions::new().name("panscreen").retry_on_initial_connect();
        if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &nats.token {
            options = options.token(token.clone());
        }
        if let Some(creds) = &nats.creds_file {
            options = options.credentials_file(creds).await.map_err(unavailable)?;
        }
        if let Some(ca) = &nats.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = tokio::time::timeout(Duration::from_secs(30), options.connect(&nats.url))
            .await
            .map_err(|_| {
                QueueError::Unavailable(format!(
                    "no answer from NATS at {} within 30 s (set the address with --nats-url or PANSCREEN_NATS_URL)",
                    nats.url
                ))
            })?
            .map_err(|error| {
                QueueError::Unavailable(format!(
                    "cannot connect to NATS at {} (--nats-url, PANSCREEN_NATS_URL): {error}",
                    nats.url
                ))
            })?;
        Ok(JetStreamQueue {
            context: jetstream::new(client),
            stream_name: stream_name(campaign),
            campaign: campaign.to_string(),
            settings,
        })
    }

    /// Whether the campaign's stream exists (a read-only look).
    pub async fn campaign_exists(&self) -> Result<bool, QueueError> {
        match self.context.get_stream(&self.stream_name).await {
            Ok(_) => Ok(true),
            Err(error) => match error.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(inner)
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(false)
                }
                _ => Err(unavailable(error)),
            },
        }
    }

    /// The names of every panscreen campaign stream on the server.
    pub async fn campaign_streams(&self) -> Result<Vec<String>, QueueError> {
        let mut names = self.context.stream_names();
        let mut found = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(unavailable)?;
            if name.starts_with("PANSCREEN_") && !name.ends_with("_STATS") {
                found.push(name);
            }
        }
        Ok(found)
    }

    /// Creates the campaign's stream if it is missing (idempotent).
    pub async fn ensure_topology(&self) -> Result<stream::Stream, QueueError> {
        self.context
            .get_or_create_stream(stream::Config {
                name: self.stream_name.clone(),
                subjects: vec![format!("panscreen.{}.>", self.campaign)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: self.settings.replicas,
                duplicate_window: self.settings.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(unavailable)
    }

    /// Creates the durable consumer `consumer` on `subject` if it is missing (idempotent).
    pub async fn ensure_consumer(
        &self,
        subject: &str,
        consumer: &str,
    ) -> Result<consumer::PullConsumer, QueueError> {
        let stream = self.ensure_topology().await?;
        let name = consumer_name(consumer, subject);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subject.to_string(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.settings.ack_wait,
            max_deliver: self.settings.max_deliver,
            backoff: self.settings.backoff.clone(),
            max_ack_pending: self.settings.max_ack_pending,
            ..Default::default()
        };
        stream.get_or_create_consumer(&name, config).await.map_err(unavailable)
    }

    /// The campaign's key-value bucket where services report their counters.
    pub async fn stats_bucket(&self) -> Result<jetstream::kv::Store, QueueError> {
        let bucket = format!("{}_STATS", self.stream_name);
        match self.context.get_key_value(&bucket).await {
            Ok(store) => Ok(store),
            Err(_) => self
                .context
                .create_or_update_key_value(jetstream::kv::Config {
                    bucket,
                    history: 1,
                    storage: stream::StorageType::File,
                    num_replicas: self.settings.replicas,
                    ..Default::default()
                })
                .await
                .map_err(unavailable),
        }
    }

    /// The status bucket if it exists (read-only commands create nothing).
    pub async fn existing_stats_bucket(&self) -> Result<Option<jetstream::kv::Store>, QueueError> {
        let bucket = format!("{}_STATS", self.stream_name);
        match self.context.get_key_value(&bucket).await {
            Ok(store) => Ok(Some(store)),
            Err(error) if error.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                Ok(None)
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Backlog of the durable consumer `consumer` on `subject`; zeros when it does not
    /// exist yet.
    pub async fn backlog(&self, subject: &str, consumer: &str) -> Result<Backlog, QueueError> {
        let stream = self.context.get_stream(&self.stream_name).await.map_err(unavailable)?;
        match stream.consumer_info(consumer_name(consumer, subject)).await {
            Ok(info) => Ok(Backlog {
                pending: info.num_pending,
                in_flight: info.num_ack_pending as u64,
                redelivered: info.num_redelivered as u64,
                consumers: 1,
            }),
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::context::ConsumerInfoErrorKind::NotFound
                        | jetstream::context::ConsumerInfoErrorKind::StreamNotFound
                ) =>
            {
                Ok(Backlog::default())
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }
}

#[async_trait]
impl Queue for JetStreamQueue {
    async fn publish(
        &self,
        subject: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<Published, QueueError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", message_id);
        let failed = |error: String| QueueError::PublishFailed {
            subject: subject.to_string(),
            detail: error,
        };
        let ack = self
            .context
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let ack = ack.await.map_err(|e| failed(e.to_string()))?;
        Ok(if ack.duplicate { Published::Duplicate } else { Published::New })
    }

    async fn subscribe(
        &self,
        subject: &str,
        consumer: &str,
    ) -> Result<Box<dyn Subscription>, QueueError> {
        let consumer = self.ensure_consumer(subject, consumer).await?;
        let messages = pull(&consumer).await?;
        Ok(Box::new(JetStreamSubscription { consumer, messages }))
    }
}

/// A pull stream that asks for one message at a time, when the subscriber asks for one:
/// a worker holds only what it can start, so nothing waits in a buffer while its ack
/// wait runs out (the default pull asks for 200).
async fn pull(consumer: &consumer::PullConsumer) -> Result<consumer::pull::Stream, QueueError> {
    consumer
        .stream()
        .max_messages_per_batch(1)
        .expires(Duration::from_secs(10))
        .heartbeat(Duration::from_secs(4))
        .messages()
        .await
        .map_err(unavailable)
}

struct JetStreamSubscription {
    consumer: consumer::PullConsumer,
    messages: consumer::pull::Stream,
}

#[async_trait]
impl Subscription for JetStreamSubscription {
    /// Never ends and never fails: when the server goes away (a restart, a network
    /// cut), the pull stream is opened again until it is back. The caller's shutdown
    /// signal is what stops a worker.
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        loop {
            match self.messages.next().await {
                Some(Ok(message)) => {
                    let attempt =
                        message.info().map(|info| info.delivered.max(1) as u32).unwrap_or(1);
                    let (message, acker) = message.split();
                    return Some(Ok(Delivery::new(
                        message.payload,
                        attempt,
                        Box::new(JetStreamSettle { acker }),
                    )));
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "pulling messages failed; pulling again")
                }
                None => tracing::warn!("the pull stream ended; opening it again"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            match pull(&self.consumer).await {
                Ok(messages) => self.messages = messages,
                Err(error) => tracing::warn!(%error, "cannot reopen the pull stream yet"),
            }
        }
    }

    async fn drain(&mut self) {
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_millis(100), self.messages.next()).await
        {
            if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(%error, "handing back a fetched message failed; it returns after the ack wait");
            }
        }
    }
}

struct JetStreamSettle {
    acker: jetstream::message::Acker,
}

#[async_trait]
impl Settle for JetStreamSettle {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        let result = match settlement {
            Settlement::Ack => self.acker.double_ack().await,
            Settlement::Nak(delay) => self.acker.ack_with(AckKind::Nak(Some(delay))).await,
            Settlement::Term => self.acker.double_ack_with(AckKind::Term).await,
        };
        result.map_err(unavailable)
    }

    async fn progress(&self) -> Result<(), QueueError> {
        self.acker.ack_with(AckKind::Progress).await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_for_jetstream() {
        assert_eq!(stream_name("2026 ningbo.a"), "PANSCREEN_2026_NINGBO_A");
        assert_eq!(
            consumer_name("panscreen-preprocess", "panscreen.c1.ingested"),
            "panscreen-preprocess-ingested"
        );
    }
}
