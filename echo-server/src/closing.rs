//! Closing connections take turns. A connection that ends answers its last unfinished frame,
//! shuts its side down and closes its socket, a few system calls and the kernel's loopback
//! work for each. Many connections ending together (a thousand clients closing at once, an
//! idle timeout reached by many) are as many tasks woken at once, queued ahead of the live
//! connections woken with them or after them: a live connection waited for the whole burst
//! (the fairness bench's `stalled closed` phase, issue 37). In turn, one close runs at a
//! time, and the next begins only after the runtime has looked at its sockets again: a live
//! connection whose bytes arrived meanwhile is served before the rest of the burst.
//!
//! The turn is a semaphore of one permit. Ending a turn yields before giving the permit on:
//! tokio runs a yielded task again only after it has polled its I/O driver, and a task
//! woken there is queued first.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The server's closing connections, one at a time. Clones share the turn.
#[derive(Debug, Clone)]
pub(crate) struct Closing {
    turn: Arc<Semaphore>,
}

impl Default for Closing {
    fn default() -> Self {
        Closing {
            turn: Arc::new(Semaphore::new(1)),
        }
    }
}

/// One connection's turn to close; the next waits until [`Turn::end`] (or its drop).
#[derive(Debug)]
pub(crate) struct Turn {
    /// `None` only if the semaphore were closed, which nothing does.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Closing {
    /// Wait for this connection's turn (first come, first served).
    pub(crate) async fn turn(&self) -> Turn {
        Turn {
            _permit: self.turn.clone().acquire_owned().await.ok(),
        }
    }
}

impl Turn {
    /// The close is done: let the runtime look at its sockets, then hand the turn on.
    pub(crate) async fn end(self) {
        tokio::task::yield_now().await;
        drop(self);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[tokio::test]
    async fn a_connection_whose_bytes_arrive_during_a_burst_of_closes_goes_before_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut live, _) = listener.accept().await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = |what: String| order.lock().unwrap().push(what);

        // The live connection waits for its peer's bytes, registered with the runtime.
        let live_order = order.clone();
        let live_task = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            live.read_exact(&mut byte).await.unwrap();
            live_order.lock().unwrap().push("live".to_owned());
        });
        tokio::task::yield_now().await;
        // Its bytes are in the kernel; the runtime sees them at its next look at its
        // sockets, while three connections close.
        client.write_all(b"x").await.unwrap();
        let closing = Closing::default();
        let closes: Vec<_> = (1..=3)
            .map(|i| {
                let (closing, order) = (closing.clone(), order.clone());
                tokio::spawn(async move {
                    let turn = closing.turn().await;
                    order.lock().unwrap().push(format!("close {i}"));
                    turn.end().await;
                })
            })
            .collect();
        for close in closes {
            close.await.unwrap();
        }
        live_task.await.unwrap();
        log("done".into());
        assert_eq!(
            *order.lock().unwrap(),
            ["close 1", "live", "close 2", "close 3", "done"],
            "the live connection is served after the close under way, before the others"
        );
    }

    #[tokio::test]
    async fn a_turn_dropped_without_its_end_hands_the_turn_on() {
        let closing = Closing::default();
        drop(closing.turn().await);
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), closing.turn()).await;
        assert!(next.is_ok(), "the turn was handed on");
    }
}
