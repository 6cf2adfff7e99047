//! Time bounds of one API connection: how long a request head may take, how long a
//! keep-alive connection may sit idle, and how long a response may take to be written.
//!
//! hyper's HTTP/1 server has one timer, `header_read_timeout`, started each time the
//! connection begins waiting for a request head (when it opens and after every response)
//! and polled while the head is read. [`HeadClock`] is the [`Timer`] behind it, and its
//! sleep decides the deadline itself from what the connection has seen:
//! - a new connection must complete its first head within `header` of opening;
//! - a keep-alive connection may wait `idle` for its next request to start, and once the
//!   first byte of that request arrives the head must be complete within `header`.
//!
//! When the sleep ends, hyper closes the connection; the clock remembers which bound it was
//! ([`Phase`]) for the counters. [`Guarded`] wraps the socket: it tells the clock when bytes
//! arrive, and fails a write that has not been taken by the client `write` after it began
//! (a client that stops reading cannot hold a connection, or a request slot, forever).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Sleep, Timer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Which bound ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A request head was not complete in time.
    Header,
    /// No request started on a keep-alive connection in time (a normal end).
    Idle,
    /// A response was not written in time.
    Write,
}

#[derive(Debug)]
struct ClockState {
    /// Request heads received on this connection.
    served: u64,
    /// When the connection began waiting for its current head.
    waiting_since: Instant,
    /// When the first byte arrived since then.
    first_byte: Option<Instant>,
    ended_by: Option<Phase>,
}

#[derive(Debug)]
pub(crate) struct HeadClock {
    opened: Instant,
    header: Duration,
    idle: Duration,
    state: Mutex<ClockState>,
}

impl HeadClock {
    pub(crate) fn new(header: Duration, idle: Duration) -> Arc<HeadClock> {
        let now = Instant::now();
        Arc::new(HeadClock {
            opened: now,
            header,
            idle,
            state: Mutex::new(ClockState {
                served: 0,
                waiting_since: now,
                first_byte: None,
                ended_by: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A complete request head arrived (the request is handled now).
    pub(crate) fn head_received(&self) {
        let mut s = self.state();
        s.served += 1;
        s.first_byte = None;
    }

    /// Which bound ended the connection, if one did.
    pub(crate) fn ended_by(&self) -> Option<Phase> {
        self.state().ended_by
    }

    /// Request heads received.
    pub(crate) fn served(&self) -> u64 {
        self.state().served
    }

    fn bytes_arrived(&self) {
        let mut s = self.state();
        if s.first_byte.is_none() {
            s.first_byte = Some(Instant::now());
        }
    }

    fn wait_for_head(&self) {
        let mut s = self.state();
        s.waiting_since = Instant::now();
        s.first_byte = None;
    }

    fn write_timed_out(&self) {
        self.state().ended_by = Some(Phase::Write);
    }

    /// The deadline for the head being waited for, and the bound it is.
    fn deadline(&self) -> (Instant, Phase) {
        let s = self.state();
        match (s.served, s.first_byte) {
            (0, _) => (self.opened + self.header, Phase::Header),
            (_, Some(first)) => (first + self.header, Phase::Header),
            (_, None) => (s.waiting_since + self.idle, Phase::Idle),
        }
    }
}

/// The timer hyper's header-read timeout runs on (see the module note). hyper's own
/// deadline is ignored: the clock's decides.
#[derive(Clone)]
pub(crate) struct ClockTimer(pub(crate) Arc<HeadClock>);

impl Timer for ClockTimer {
    fn sleep(&self, _duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(std::time::Instant::now())
    }

    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn Sleep>> {
        self.0.wait_for_head();
        let (deadline, _) = self.0.deadline();
        Box::pin(HeadSleep {
            clock: self.0.clone(),
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
        })
    }
}

struct HeadSleep {
    clock: Arc<HeadClock>,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // hyper polls this every time reading the head makes no progress, so a first byte
        // that arrived since the last poll moves the deadline here.
        let (deadline, phase) = this.clock.deadline();
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.clock.state().ended_by = Some(phase);
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Sleep for HeadSleep {}

/// The connection's socket, with the clock told about arriving bytes and a bound on
/// writing each response.
pub(crate) struct Guarded {
    stream: TcpStream,
    clock: Arc<HeadClock>,
    write_timeout: Duration,
    /// Set by the first write after the last completed flush.
    writing_since: Option<Instant>,
    write_deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Guarded {
    pub(crate) fn new(stream: TcpStream, clock: Arc<HeadClock>, write_timeout: Duration) -> Self {
        Guarded {
            stream,
            clock,
            write_timeout,
            writing_since: None,
            write_deadline: Box::pin(tokio::time::sleep(write_timeout)),
        }
    }

    /// Before a write: start the clock, or fail if the write has taken too long already.
    fn check_write(&mut self) -> io::Result<()> {
        let since = *self.writing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.write_timeout {
            return Err(self.timed_out());
        }
        Ok(())
    }

    /// The socket is not writable: wait for it or for the write deadline.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(since) = self.writing_since else {
            return Poll::Pending;
        };
        let deadline = since + self.write_timeout;
        if self.write_deadline.deadline() != deadline {
            self.write_deadline.as_mut().reset(deadline);
        }
        match self.write_deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(self.timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn timed_out(&self) -> io::Error {
        self.clock.write_timed_out();
        io::Error::new(io::ErrorKind::TimedOut, "response not written in time")
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.bytes_arrived();
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check_write() {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut this.stream).poll_write(cx, data) {
            Poll::Pending => this.poll_deadline(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check_write() {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.poll_deadline(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                // Everything written so far is with the kernel: the response is out.
                this.writing_since = None;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_what_the_connection_saw() {
        let clock = HeadClock::new(Duration::from_secs(2), Duration::from_secs(30));
        let opened = Instant::now();
        assert_eq!(
            clock.deadline(),
            (opened + Duration::from_secs(2), Phase::Header)
        );
        // Bytes of the first head do not extend the first deadline.
        tokio::time::advance(Duration::from_secs(1)).await;
        clock.bytes_arrived();
        assert_eq!(clock.deadline().0, opened + Duration::from_secs(2));
        clock.head_received();
        // After a response: idle, then a head started 10 s into the wait.
        clock.wait_for_head();
        let idle_from = Instant::now();
        assert_eq!(
            clock.deadline(),
            (idle_from + Duration::from_secs(30), Phase::Idle)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        clock.bytes_arrived();
        let first = Instant::now();
        assert_eq!(
            clock.deadline(),
            (first + Duration::from_secs(2), Phase::Header)
        );
        assert_eq!(clock.served(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sleep_ends_at_the_idle_deadline_and_says_so() {
        let clock = HeadClock::new(Duration::from_secs(2), Duration::from_secs(30));
        clock.head_received();
        let timer = ClockTimer(clock.clone());
        let started = Instant::now();
        timer.sleep_until(std::time::Instant::now()).await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(clock.ended_by(), Some(Phase::Idle));
    }
}
