//! Start-up steps that wait for the store or NATS instead of failing the service.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

/// Runs a start-up step until it succeeds, pausing 0.5 s, 1 s, 2 s … up to 15 s between
/// tries: a service started (or restarted) while the store is down waits for it, not
/// ready, instead of exiting.
pub async fn until_it_works<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    mut step: impl FnMut() -> F,
) -> T {
    let mut pause = Duration::from_millis(500);
    loop {
        match step().await {
            Ok(value) => return value,
            Err(error) => {
                warn!(error = %error, retry_in_s = pause.as_secs_f64(), "{what} failed at start-up; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(15));
            }
        }
    }
}
