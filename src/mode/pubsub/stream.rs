//! The writing side of a streaming subscription: the response head, then
//! each batch of messages the stream pulls, encoded in its format and written
//! in pieces of about [`FLUSH_AT`] bytes, keepalives when it is quiet, and
//! the end of the body when its channel ends. What to pull is the caller's
//! (`mod.rs`); this file only waits, encodes and writes.

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Reject;
use crate::http::response::{end_of_body, write_piece};
use crate::http::{Exchange, Head, Payload};
use crate::mailbox::Mailbox;
use crate::metrics::Stats;
use crate::mode::pubsub::format::{Encoder, Format};
use crate::mode::pubsub::store::Pulled;
use crate::mode::wait::{Sleep, Watched, watch};

/// How many encoded bytes a stream gathers before it writes them.
const FLUSH_AT: usize = 32 * 1024;

/// How long a stream that just wrote messages lingers before it looks for
/// more: a fast publisher's messages then reach each of its streams in
/// batches, one wake-up for many, instead of a wake-up per message per
/// stream (which starves the publisher of CPU on a small machine). A
/// message is written at once unless it follows another within this time.
const LINGER: Duration = Duration::from_millis(2);

/// Why a stream ended.
pub enum Ended {
    /// Its client left.
    HungUp,
    /// Its channel was deleted or the server is stopping.
    By(Reject),
}

/// Writes the stream's head and `first` batch, then, each time `bell` rings,
/// what `pull` brings, until the client leaves or `pull` fails.
#[allow(clippy::too_many_arguments)] // each is a distinct part of one subscription
pub fn follow(
    ex: &mut Exchange,
    format: Format,
    mime: Option<&str>,
    first: Pulled,
    bell: &Mailbox<()>,
    keepalive: Duration,
    mut pull: impl FnMut() -> Result<Pulled, Reject>,
    stats: &Stats,
) -> Ended {
    let mut head = Head::new(200);
    head.header("Content-Type", format.content_type(mime))
        .header("Cache-Control", "no-cache")
        .header("X-Accel-Buffering", "no");
    if first.missed > 0 {
        head.header("Patch-Missed", first.missed.to_string());
    }
    let payload = Payload::for_body(ex.request.version, None);
    let head = ex.start_response(head, payload);
    let mut out = StreamOut {
        sink: ex.conn.shared_stream(),
        payload,
        head,
        data: Vec::new(),
        last_sent: Instant::now(),
        written: 0,
    };
    let mut pulled = Some(first);
    let ended = loop {
        let more = pulled.as_ref().is_some_and(|batch| batch.more);
        let wrote = pulled
            .as_ref()
            .is_some_and(|batch| !batch.messages.is_empty());
        if let Some(batch) = &pulled {
            stats.delivered(batch.messages.len() as u64);
        }
        if out.send(format, pulled.take()).is_err() {
            break Ended::HungUp;
        }
        // A keepalive too far off to represent is never sent.
        let keepalive_at = out.last_sent.checked_add(keepalive);
        let rung = if more || (wrote && bell.linger(Instant::now() + LINGER).is_some()) {
            Watched::Got(())
        } else {
            // Rung to carry on: blind.
            watch(bell, ex, keepalive_at, Sleep::Blind)
        };
        match rung {
            Watched::Got(()) | Watched::Abandoned => match pull() {
                Ok(batch) => pulled = Some(batch),
                Err(reject) => break Ended::By(reject),
            },
            Watched::HungUp => break Ended::HungUp,
            Watched::Timeout => {
                format.write_keepalive(&mut out.data);
                // A raw stream has no keepalive: its timer just restarts.
                out.last_sent = Instant::now();
            }
        }
    };
    if let Ended::By(_) = ended {
        if out.flush().is_ok() {
            let _ = (&mut &*out.sink).write_all(end_of_body(payload));
        }
    }
    ex.add_sent(out.written);
    ended
}

/// The writing side of a stream: the response head, until the first write,
/// and a small buffer of encoded bytes, written out whenever it fills.
struct StreamOut {
    sink: Arc<TcpStream>,
    payload: Payload,
    /// The response head, sent with the first piece.
    head: Vec<u8>,
    data: Vec<u8>,
    /// When something was last written, for the keepalive timer.
    last_sent: Instant,
    /// Body bytes written.
    written: u64,
}

impl StreamOut {
    /// Encodes and writes `batch`, and whatever is pending (the head, a
    /// keepalive).
    fn send(&mut self, format: Format, batch: Option<Pulled>) -> io::Result<()> {
        if let Some(batch) = batch {
            if batch.missed > 0 {
                format.write_missed(batch.missed, &mut self.data);
            }
            for message in &batch.messages {
                let mut encoder = Encoder::new(format, message);
                while encoder.write_next(&mut self.data) {
                    if self.data.len() >= FLUSH_AT {
                        self.flush()?;
                    }
                }
            }
        }
        self.flush()
    }

    /// Writes what is pending as one piece of the body.
    fn flush(&mut self) -> io::Result<()> {
        if self.head.is_empty() && self.data.is_empty() {
            return Ok(());
        }
        write_piece(&mut &*self.sink, self.payload, &self.head, &self.data)?;
        self.written += self.data.len() as u64;
        self.head.clear();
        self.data.clear();
        self.last_sent = Instant::now();
        Ok(())
    }
}
