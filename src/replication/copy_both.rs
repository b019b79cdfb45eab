//! CopyBoth mode: XLogData and keepalives in, standby status updates out.

use bytes::{Buf, BufMut, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::{check_frame_size, unexpected, ReplicationConnection};
use super::{ReplicationError, ServerError};
use crate::lsn::pg_now_micros;
use crate::lsn::Lsn;

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicationMessage {
    /// `w`: one output-plugin message. In logical replication `wal_start == wal_end` is the
    /// plugin's write position, `0/0` for Relation and Type messages.
    XLogData {
        /// The WAL position the data starts at.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// When the server sent it, µs since 2000-01-01 UTC.
        send_time: i64,
        /// The output plugin's message (pgoutput bytes).
        data: Bytes,
    },
    /// `k`: the server's send position; answer at once when `reply_requested`.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// When the server sent it, µs since 2000-01-01 UTC.
        send_time: i64,
        /// The server wants a status update now (else it may end the connection at
        /// `wal_sender_timeout`).
        reply_requested: bool,
    },
    /// A NoticeResponse inside copy mode (e.g. PG18's "skipped loading publication").
    Notice(ServerError),
}

/// The positions of a standby status update. `flush` is what moves a logical slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusUpdate {
    /// Received and written up to here.
    pub write: Lsn,
    /// Durably processed up to here: the slot may release WAL before it.
    pub flush: Lsn,
    /// Applied up to here.
    pub apply: Lsn,
}

/// A connection in CopyBoth mode after `START_REPLICATION`.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    pub(crate) fn new(conn: ReplicationConnection) -> Self {
        ReplicationStream { conn }
    }

    /// The next message already in the read buffer, without touching the socket; `None`
    /// when a read is needed. Draining with this before waiting keeps the hot loop free
    /// of timers and wake-ups.
    pub fn try_next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        loop {
            let buf = &mut self.conn.read_buf;
            check_frame_size(buf)?;
            // CopyData is by far the most frequent frame: take it apart here, slicing the
            // payload out of the shared buffer without a copy.
            if buf.len() >= 5 && buf[0] == b'd' {
                let len = super::conn::frame_len(buf)?;
                if buf.len() < len + 1 {
                    return Ok(None);
                }
                let mut frame = buf.split_to(len + 1).freeze();
                frame.advance(5);
                return parse_copy_data(frame).map(Some);
            }
            match Message::parse(buf)? {
                None => return Ok(None),
                Some(Message::ErrorResponse(e)) => {
                    return Err(ReplicationError::Server(ServerError::from_fields(
                        e.fields(),
                    )))
                }
                Some(Message::NoticeResponse(n)) => {
                    return Ok(Some(ReplicationMessage::Notice(ServerError::from_fields(
                        n.fields(),
                    ))))
                }
                // The server ends copy mode only when it shuts down or is told to stop.
                Some(Message::CopyDone) => return Err(ReplicationError::Closed),
                Some(Message::ParameterStatus(_)) => continue,
                Some(other) => return Err(unexpected("CopyData", &other)),
            }
        }
    }

    /// While [`Self::set_catching_up`] holds, a read first waits (at most 2 ms) for the
    /// socket to hold a full window, checking this often; zero turns pacing off.
    pub fn set_catch_up_pause(&mut self, pause: std::time::Duration) {
        self.conn.catch_up_pause = pause;
    }

    /// Whether the server is sending changes committed a while ago (catch-up) rather than
    /// live ones; only then are reads paced.
    pub fn set_catching_up(&mut self, catching_up: bool) {
        self.conn.catching_up = catching_up;
    }

    /// Waits for more bytes from the server. Cancellation-safe: nothing read is lost
    /// when the future is dropped.
    pub async fn fill(&mut self) -> Result<(), ReplicationError> {
        self.conn.fill().await
    }

    /// The next message, reading from the socket as needed. Cancellation-safe.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            if let Some(m) = self.try_next()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Sends a standby status update (`r`).
    pub async fn send_status(
        &mut self,
        status: StatusUpdate,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let mut body = [0u8; 34];
        {
            let mut w = &mut body[..];
            w.put_u8(b'r');
            w.put_u64(status.write.0);
            w.put_u64(status.flush.0);
            w.put_u64(status.apply.0);
            w.put_i64(pg_now_micros());
            w.put_u8(u8::from(reply_requested));
        }
        frontend::CopyData::new(&body[..])?.write(&mut self.conn.write_buf);
        self.conn.flush().await
    }

    /// Ends streaming cleanly: a final status update, CopyDone, then waits for the server to
    /// finish (its CopyDone, CommandComplete, ReadyForQuery) and closes the connection.
    pub async fn stop(mut self, last: StatusUpdate) -> Result<(), ReplicationError> {
        self.send_status(last, false).await?;
        frontend::copy_done(&mut self.conn.write_buf);
        self.conn.flush().await?;
        let drain = async {
            loop {
                match self.try_next() {
                    Ok(Some(_)) => continue,
                    Ok(None) => self.fill().await?,
                    // The server's CopyDone: what follows is ordinary messages.
                    Err(ReplicationError::Closed) => break,
                    Err(e) => return Err(e),
                }
            }
            loop {
                match Message::parse(&mut self.conn.read_buf)? {
                    Some(Message::ReadyForQuery(_)) => break,
                    Some(Message::ErrorResponse(e)) => {
                        return Err(ReplicationError::Server(ServerError::from_fields(
                            e.fields(),
                        )))
                    }
                    Some(_) => continue,
                    None => self.fill().await?,
                }
            }
            Ok::<(), ReplicationError>(())
        };
        let timeout = std::time::Duration::from_secs(10);
        match tokio::time::timeout(timeout, drain).await {
            Ok(r) => r?,
            Err(_) => return Err(ReplicationError::Timeout(timeout, "the end of streaming")),
        }
        frontend::terminate(&mut self.conn.write_buf);
        // The server may already have gone; a failed goodbye changes nothing.
        let _ = self.conn.flush().await;
        Ok(())
    }
}

fn parse_copy_data(mut frame: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let short = |what: &str| ReplicationError::Protocol(format!("short {what} message"));
    if frame.is_empty() {
        return Err(short("replication"));
    }
    match frame.get_u8() {
        b'w' => {
            if frame.len() < 24 {
                return Err(short("XLogData"));
            }
            let wal_start = Lsn(frame.get_u64());
            let wal_end = Lsn(frame.get_u64());
            let send_time = frame.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data: frame,
            })
        }
        b'k' => {
            if frame.len() != 17 {
                return Err(short("keepalive"));
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(frame.get_u64()),
                send_time: frame.get_i64(),
                reply_requested: frame.get_u8() == 1,
            })
        }
        other => Err(ReplicationError::UnexpectedMessage {
            expected: "XLogData or keepalive",
            got: other as char,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_data_payloads() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&5u64.to_be_bytes());
        w.extend_from_slice(&5u64.to_be_bytes());
        w.extend_from_slice(&7i64.to_be_bytes());
        w.extend_from_slice(b"B...");
        match parse_copy_data(Bytes::from(w)) {
            Ok(ReplicationMessage::XLogData {
                wal_start, data, ..
            }) => {
                assert_eq!(wal_start, Lsn(5));
                assert_eq!(&data[..], b"B...");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&9u64.to_be_bytes());
        k.extend_from_slice(&1i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k)).ok(),
            Some(ReplicationMessage::Keepalive {
                wal_end: Lsn(9),
                send_time: 1,
                reply_requested: true
            })
        );
        for bad in [&b""[..], b"w123", b"k1", b"x"] {
            assert!(parse_copy_data(Bytes::copy_from_slice(bad)).is_err());
        }
    }
}
