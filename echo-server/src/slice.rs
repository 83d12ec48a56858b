//! The cooperative slice: how much one connection serves per wake-up before it lets the
//! others run. With one worker (a one-CPU server) every connection's task shares one
//! thread, and the runtime polls its sockets only between tasks (when its queue is empty, or
//! every 61 task polls): a connection whose socket is always readable, left alone, reads and
//! echoes until its peer pauses, and a light connection woken meanwhile waits behind all of
//! it. A connection that has used up its slice yields; the yielded task runs again only
//! after the worker has polled its sockets, so the light connections woken by that poll run
//! before the heavy one's next slice. A light connection then waits for one slice of each
//! connection ahead of it, not for all they have to send.
//!
//! The slice is counted in bytes read since the task last waited for its socket (a wait
//! gives the others their turn already) or yielded. Both loops that read a peer's bytes
//! count it: echoing ([`crate::server`]'s handler, 64 reads: a yield costs the echo's
//! throughput, see `server::SLICE`) and dropping what a refused peer still sends (the
//! linger after an oversized frame, one read: what it drops serves no one). The linger had
//! no slice and read up to 4 MiB per wake-up in 4 KiB reads; 32 refused peers at once kept
//! a light connection waiting behind all of it (the fairness bench's oversized-frames phase,
//! issue 37). Pure: [`Slice::served`] says when to yield; the caller yields.
//!
//! Tried and left out (issue 37, the fairness bench, 4–5 runs of each in turn with the code
//! as it is): a lane that lets one connection at a time answer a read that filled its buffer
//! (or its first), with a look at the sockets between two answers; the runtime looking at
//! its sockets every 4 task polls instead of 61; a slice of one read. None moved the
//! well-behaved client's p99. What did was elsewhere: the attack's thousand stalled
//! connections closing at once, each queued ahead of the live one ([`crate::closing`]).

/// Bytes read per wake-up, at most, before the connection yields: one slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slice {
    limit: usize,
    served: usize,
}

impl Slice {
    /// A slice of `limit` bytes (at least one byte).
    pub(crate) fn new(limit: usize) -> Slice {
        Slice {
            limit: limit.max(1),
            served: 0,
        }
    }

    /// `n` more bytes read without waiting: `true` once the slice is used up, and the
    /// connection must yield before it reads again (the count starts over).
    pub(crate) fn served(&mut self, n: usize) -> bool {
        self.served += n;
        if self.served >= self.limit {
            self.served = 0;
            true
        } else {
            false
        }
    }

    /// The connection waited for its socket: the others had their turn, a new slice begins.
    pub(crate) fn waited(&mut self) {
        self.served = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_ends_at_its_limit_and_starts_over() {
        let mut slice = Slice::new(32);
        let yields: Vec<bool> = [16, 15, 1, 16, 16, 40]
            .iter()
            .map(|&n| slice.served(n))
            .collect();
        assert_eq!(yields, [false, false, true, false, true, true]);
    }

    #[test]
    fn a_wait_starts_a_new_slice() {
        let mut slice = Slice::new(32);
        assert!(!slice.served(31));
        slice.waited();
        assert!(!slice.served(31), "the wait gave the others their turn");
        assert!(slice.served(1));
    }

    #[test]
    fn a_zero_limit_yields_after_every_read() {
        let mut slice = Slice::new(0);
        assert!(slice.served(1) && slice.served(1));
    }
}
