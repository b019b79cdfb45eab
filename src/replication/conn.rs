//! Connection start-up, authentication and replication commands (simple query protocol).

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{Host, TargetSessionAttrs};

use super::copy_both::ReplicationStream;
use super::pacing::Pacer;
use super::{validate_slot_name, ReplicationError, ServerError, MAX_FRAME};
use crate::lsn::Lsn;
use crate::pg::config::SourceConfig;
use crate::pg::quote_ident;
use crate::pg::tls::TlsMode;

/// Anything we can speak the protocol over: TCP, a Unix socket, or TLS on TCP.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// GUCs pinned for the walsender session, because pgoutput renders text values with the
/// session's output functions and the event format depends on these.
const PINNED_OPTIONS: &str =
    "-c datestyle=ISO -c intervalstyle=postgres -c timezone=UTC -c extra_float_digits=3";

/// Receive buffer for connections to a server on the same machine (see `connect_one`).
const LOOPBACK_RCVBUF: usize = 32 * 1024;

/// One row of a simple-query result: column names and text values.
#[derive(Debug, Clone, Default)]
pub struct SqlRow {
    /// Each column's name and text value (`None` for NULL), in result order.
    pub columns: Vec<(String, Option<String>)>,
}

impl SqlRow {
    /// The text value of a column by name (None for NULL or a missing column).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.columns
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifySystem {
    /// The cluster's system identifier (decimal text).
    pub system_id: String,
    /// The current timeline.
    pub timeline: u64,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to; `None` for a physical replication connection.
    pub dbname: Option<String>,
}

/// The answer to `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCreated {
    /// The slot's name.
    pub slot_name: String,
    /// The position from which the slot's changes are consistent.
    pub consistent_point: Lsn,
    /// The exported snapshot that sees the data as of `consistent_point`; `None` when no
    /// snapshot was exported.
    pub snapshot_name: Option<String>,
}

/// A connection in walsender mode (`replication=database`), before streaming starts.
pub struct ReplicationConnection {
    pub(crate) io: Box<dyn Transport>,
    pub(crate) read_buf: BytesMut,
    pub(crate) write_buf: BytesMut,
    server_version_num: u32,
    backend_pid: i32,
    /// The server said `in_hot_standby = on` at start-up (PostgreSQL 14+ reports it).
    hot_standby: bool,
    /// While catching up, the wait before a read checks the socket this often; zero: no
    /// pacing (see [`super::pacing`]).
    pub(crate) catch_up_pause: std::time::Duration,
    /// Set by the consumer of the stream: the server is sending old changes.
    pub(crate) catching_up: bool,
    /// `None` for a socket that cannot be asked how much it holds.
    pacer: Option<Pacer>,
}

impl ReplicationConnection {
    /// Connects, authenticates and waits for the server to be ready for commands.
    pub async fn connect(config: &SourceConfig) -> Result<Self, ReplicationError> {
        let timeout = config.connect_timeout();
        // As libpq: a host of the wrong kind is passed over, since the next one may be
        // right (after a failover, the promoted standby).
        let wanted = match config.pg().get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => Some(false),
            TargetSessionAttrs::ReadOnly => Some(true),
            _ => None,
        };
        let mut last_err = None;
        for (host, port) in config.targets() {
            let attempt = tokio::time::timeout(timeout, Self::connect_one(config, &host, port));
            match attempt.await {
                Ok(Ok(conn)) if wanted.is_some_and(|standby| standby != conn.hot_standby) => {
                    last_err = Some(ReplicationError::WrongServerKind {
                        target: describe_target(&host, port),
                        standby: conn.hot_standby,
                    });
                }
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => {
                    // Authentication and server errors are answers, not unreachable hosts.
                    if !matches!(e, ReplicationError::Connect { .. }) {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
                Err(_) => last_err = Some(ReplicationError::Timeout(timeout, "the connection")),
            }
        }
        Err(last_err.unwrap_or(ReplicationError::Protocol("no host to connect to".into())))
    }

    async fn connect_one(
        config: &SourceConfig,
        host: &Host,
        port: u16,
    ) -> Result<Self, ReplicationError> {
        let target = describe_target(host, port);
        let pacer;
        let io: Box<dyn Transport> = match host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|source| ReplicationError::Connect { target, source })?;
                pacer = Pacer::new(&s);
                Box::new(s)
            }
            Host::Tcp(h) => {
                let tcp = tokio::net::TcpStream::connect((h.as_str(), port))
                    .await
                    .map_err(|source| ReplicationError::Connect { target, source })?;
                tcp.set_nodelay(true)?;
                if tcp.peer_addr().is_ok_and(|a| a.ip().is_loopback()) {
                    // A bounded window makes the walsender's sends queue behind it while
                    // we are busy (cheap appends) instead of each crossing the loopback
                    // stack to us; with a round trip of microseconds, 32 KiB never limits
                    // throughput. Remote servers keep the kernel's autotuning, which a
                    // fixed buffer would cripple on a long round trip.
                    socket2::SockRef::from(&tcp).set_recv_buffer_size(LOOPBACK_RCVBUF)?;
                }
                pacer = Pacer::new(&tcp);
                Self::maybe_tls(config, h, tcp).await?
            }
        };
        let mut conn = ReplicationConnection {
            io,
            read_buf: BytesMut::with_capacity(128 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            server_version_num: 0,
            backend_pid: 0,
            hot_standby: false,
            catch_up_pause: std::time::Duration::ZERO,
            catching_up: false,
            pacer,
        };
        conn.startup(config).await?;
        Ok(conn)
    }

    async fn maybe_tls(
        config: &SourceConfig,
        host: &str,
        mut tcp: tokio::net::TcpStream,
    ) -> Result<Box<dyn Transport>, ReplicationError> {
        let Some(tls) = config
            .rustls_config()
            .map_err(|e| ReplicationError::Tls(e.to_string()))?
        else {
            return Ok(Box::new(tcp));
        };
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        tcp.write_all(&buf).await?;
        let answer = tcp.read_u8().await?;
        match answer {
            b'S' => {}
            b'N' if config.tls_mode() == TlsMode::Prefer => return Ok(Box::new(tcp)),
            b'N' => return Err(ReplicationError::TlsRefused),
            other => {
                return Err(ReplicationError::UnexpectedMessage {
                    expected: "SSL answer S or N",
                    got: other as char,
                })
            }
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| ReplicationError::Tls(format!("invalid server name {host:?}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(handshake_error)?;
        Ok(Box::new(stream))
    }

    async fn startup(&mut self, config: &SourceConfig) -> Result<(), ReplicationError> {
        let options = match config.pg().get_options() {
            Some(extra) if !extra.is_empty() => format!("{PINNED_OPTIONS} {extra}"),
            _ => PINNED_OPTIONS.to_owned(),
        };
        let params = [
            ("user", config.user()),
            ("database", config.dbname()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
            ("application_name", config.application_name()),
            ("options", options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;
        self.authenticate(config).await?;
        loop {
            match self.read_message().await? {
                Message::ParameterStatus(p) => match (p.name(), p.value()) {
                    (Ok("server_version"), Ok(v)) => {
                        self.server_version_num = parse_server_version(v)
                    }
                    (Ok("in_hot_standby"), Ok(v)) => self.hot_standby = v == "on",
                    _ => {}
                },
                Message::BackendKeyData(k) => self.backend_pid = k.process_id(),
                Message::NoticeResponse(n) => {
                    let notice = ServerError::from_fields(n.fields());
                    tracing::info!(notice = %notice, "server notice during start-up");
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(e) => {
                    return Err(ReplicationError::Server(ServerError::from_fields(
                        e.fields(),
                    )))
                }
                other => return Err(unexpected("start-up parameters", &other)),
            }
        }
    }

    async fn authenticate(&mut self, config: &SourceConfig) -> Result<(), ReplicationError> {
        let user = config.user().to_owned();
        let auth_err = |e: ServerError| {
            // 28P01 invalid_password, 28000 invalid_authorization_specification.
            if e.code.starts_with("28") {
                ReplicationError::Auth {
                    user: user.clone(),
                    message: e.message,
                }
            } else {
                ReplicationError::Server(e)
            }
        };
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    let pw = config
                        .password()
                        .ok_or(ReplicationError::PasswordRequired)?;
                    frontend::password_message(pw, &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = config
                        .password()
                        .ok_or(ReplicationError::PasswordRequired)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        config.user().as_bytes(),
                        pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let pw = config
                        .password()
                        .ok_or(ReplicationError::PasswordRequired)?;
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ReplicationError::UnsupportedAuth(
                            "SASL without SCRAM-SHA-256 (channel binding only is not supported)"
                                .into(),
                        ));
                    }
                    // We do not bind to the TLS channel; saying "n" (client does not support
                    // binding) is accepted in every case, while "y" is refused by a server
                    // that offers SCRAM-SHA-256-PLUS over TLS.
                    let mut scram = ScramSha256::new(pw, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        scram.message(),
                        &mut self.write_buf,
                    )?;
                    self.flush().await?;
                    match self.read_message().await? {
                        Message::AuthenticationSaslContinue(c) => scram.update(c.data())?,
                        Message::ErrorResponse(e) => {
                            return Err(auth_err(ServerError::from_fields(e.fields())))
                        }
                        other => return Err(unexpected("SASL continue", &other)),
                    }
                    frontend::sasl_response(scram.message(), &mut self.write_buf)?;
                    self.flush().await?;
                    match self.read_message().await? {
                        Message::AuthenticationSaslFinal(f) => scram.finish(f.data())?,
                        Message::ErrorResponse(e) => {
                            return Err(auth_err(ServerError::from_fields(e.fields())))
                        }
                        other => return Err(unexpected("SASL final", &other)),
                    }
                }
                Message::ErrorResponse(e) => {
                    return Err(auth_err(ServerError::from_fields(e.fields())))
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationSspi
                | Message::AuthenticationScmCredential => {
                    return Err(ReplicationError::UnsupportedAuth(
                        "GSS/SSPI/Kerberos".into(),
                    ))
                }
                other => return Err(unexpected("authentication", &other)),
            }
        }
    }

    /// `server_version_num` as reported at start-up (e.g. 150008).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// The walsender's process id.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        if !self.write_buf.is_empty() {
            self.io.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Reads one complete backend message (CopyBothResponse excluded: see
    /// [`Self::start_replication`]).
    async fn read_message(&mut self) -> Result<Message, ReplicationError> {
        loop {
            check_frame_size(&self.read_buf)?;
            if let Some(m) = Message::parse(&mut self.read_buf)? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes from the socket into the buffer; cancellation-safe.
    ///
    /// While catching up, it first waits for the socket to hold a full window (see
    /// [`super::pacing`]): the walsender's sends are then cheap, and we read them in one go.
    pub(crate) async fn fill(&mut self) -> Result<(), ReplicationError> {
        if self.catching_up && !self.catch_up_pause.is_zero() {
            if let Some(pacer) = &mut self.pacer {
                pacer.wait(self.catch_up_pause);
            }
        }
        if self.read_buf.capacity() - self.read_buf.len() < 8 * 1024 {
            self.read_buf.reserve(64 * 1024);
        }
        let n = self.io.read_buf(&mut self.read_buf).await?;
        if let Some(pacer) = &mut self.pacer {
            pacer.read(n);
        }
        if n == 0 {
            return Err(ReplicationError::Closed);
        }
        Ok(())
    }

    /// Runs one statement with the simple query protocol and returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SqlRow>, ReplicationError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut names: Vec<String> = Vec::new();
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::RowDescription(d) => {
                    names = d
                        .fields()
                        .map(|f| Ok(f.name().to_owned()))
                        .collect::<Vec<_>>()?;
                }
                Message::DataRow(r) => {
                    let buf = r.buffer();
                    let mut values = Vec::with_capacity(names.len());
                    let mut ranges = r.ranges();
                    while let Some(range) = ranges.next()? {
                        values.push(range.map(|rg| String::from_utf8_lossy(&buf[rg]).into_owned()));
                    }
                    rows.push(SqlRow {
                        columns: names.iter().cloned().zip(values).collect(),
                    });
                }
                Message::CommandComplete(_) | Message::EmptyQueryResponse => {}
                Message::NoticeResponse(n) => {
                    let notice = ServerError::from_fields(n.fields());
                    tracing::warn!(notice = %notice, "server notice");
                }
                Message::ErrorResponse(e) => {
                    error = Some(ServerError::from_fields(e.fields()));
                }
                Message::ParameterStatus(_) => {}
                Message::ReadyForQuery(_) => break,
                other => return Err(unexpected("query results", &other)),
            }
        }
        match error {
            Some(e) => Err(ReplicationError::Server(e)),
            None => Ok(rows),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<IdentifySystem, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |name: &str| {
            row.get(name)
                .ok_or_else(|| ReplicationError::Protocol(format!("IDENTIFY_SYSTEM lacks {name}")))
        };
        Ok(IdentifySystem {
            system_id: field("systemid")?.to_owned(),
            timeline: field("timeline")?
                .parse()
                .map_err(|_| ReplicationError::Protocol("bad timeline".into()))?,
            xlogpos: field("xlogpos")?
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("bad xlogpos: {e}")))?,
            dbname: row.get("dbname").map(str::to_owned),
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput NOEXPORT_SNAPSHOT`.
    ///
    /// The legacy bare-keyword syntax works on every supported server (14+).
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
    ) -> Result<SlotCreated, ReplicationError> {
        validate_slot_name(name)?;
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" }
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        Ok(SlotCreated {
            slot_name: row.get("slot_name").unwrap_or(name).to_owned(),
            consistent_point: row
                .get("consistent_point")
                .unwrap_or("0/0")
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("bad consistent_point: {e}")))?,
            snapshot_name: row.get("snapshot_name").map(str::to_owned),
        })
    }

    /// `DROP_REPLICATION_SLOT name WAIT`.
    pub async fn drop_slot(&mut self, name: &str) -> Result<(), ReplicationError> {
        validate_slot_name(name)?;
        self.simple_query(&format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(name)))
            .await?;
        Ok(())
    }

    /// `START_REPLICATION SLOT name LOGICAL lsn (options)`, entering CopyBoth mode.
    ///
    /// `options` are pgoutput's, already quoted as the server wants them.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, ReplicationError> {
        validate_slot_name(slot)?;
        let opts = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), v))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(slot),
            start,
            opts
        );
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            check_frame_size(&self.read_buf)?;
            if self.read_buf.len() >= 5 && self.read_buf[0] == b'W' {
                // CopyBothResponse is not known to postgres-protocol's parser.
                let len = frame_len(&self.read_buf)?;
                if self.read_buf.len() < len + 1 {
                    self.fill().await?;
                    continue;
                }
                self.read_buf.advance(len + 1);
                return Ok(ReplicationStream::new(self));
            }
            match Message::parse(&mut self.read_buf)? {
                Some(Message::ErrorResponse(e)) => {
                    return Err(ReplicationError::Server(ServerError::from_fields(
                        e.fields(),
                    )));
                }
                Some(Message::NoticeResponse(n)) => {
                    let notice = ServerError::from_fields(n.fields());
                    tracing::warn!(notice = %notice, "server notice while starting replication");
                }
                Some(Message::ParameterStatus(_)) => {}
                Some(other) => return Err(unexpected("CopyBothResponse", &other)),
                None => self.fill().await?,
            }
        }
    }
}

pub(crate) fn frame_len(buf: &[u8]) -> Result<usize, ReplicationError> {
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(ReplicationError::Protocol(format!(
            "frame length {len} is below the minimum of 4"
        )));
    }
    Ok(len)
}

/// Refuses a frame whose announced length exceeds [`MAX_FRAME`] before buffering it.
pub(crate) fn check_frame_size(buf: &[u8]) -> Result<(), ReplicationError> {
    if buf.len() >= 5 {
        let len = frame_len(buf)?;
        if len > MAX_FRAME {
            return Err(ReplicationError::FrameTooLarge {
                size: len,
                max: MAX_FRAME,
            });
        }
    }
    Ok(())
}

pub(crate) fn unexpected(expected: &'static str, got: &Message) -> ReplicationError {
    let tag = match got {
        Message::CopyData(_) => 'd',
        Message::CopyDone => 'c',
        Message::CommandComplete(_) => 'C',
        Message::DataRow(_) => 'D',
        Message::RowDescription(_) => 'T',
        Message::ReadyForQuery(_) => 'Z',
        Message::CopyInResponse(_) => 'G',
        Message::CopyOutResponse(_) => 'H',
        Message::NotificationResponse(_) => 'A',
        Message::AuthenticationOk => 'R',
        _ => '?',
    };
    ReplicationError::UnexpectedMessage { expected, got: tag }
}

/// `15.8 (Debian 15.8-1)` -> 150008; `9.6.3` -> 90603; unknown -> 0.
fn parse_server_version(v: &str) -> u32 {
    let num: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = num.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10_000 + minor
    } else {
        major * 10_000 + minor * 100 + parts.next().unwrap_or(0)
    }
}

/// A failed TLS handshake: the connection breaking under it (a server restarting) is an
/// I/O error, which retrying can fix; anything else (a certificate refused, no common
/// protocol) is a TLS error, which it cannot.
fn handshake_error(e: std::io::Error) -> ReplicationError {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut => {
            ReplicationError::Io(e)
        }
        _ => ReplicationError::Tls(e.to_string()),
    }
}

fn describe_target(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(h) => format!("{h}:{port}"),
        Host::Unix(p) => format!("{}/.s.PGSQL.{port}", p.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.8 (Debian 15.8-1.pgdg120+1)"),
            150008
        );
        assert_eq!(parse_server_version("18beta1"), 180000);
        assert_eq!(parse_server_version("9.6.3"), 90603);
    }

    /// `waltap serve` started while Postgres restarted exited on "TLS: Connection reset by
    /// peer", taken for a TLS problem (found by the chaos harness).
    #[test]
    fn a_connection_broken_during_the_handshake_is_transient() {
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::UnexpectedEof,
        ] {
            let e = handshake_error(std::io::Error::new(kind, "gone"));
            assert!(e.is_transient(), "{kind:?}: {e}");
        }
        let refused = handshake_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        ));
        assert!(matches!(refused, ReplicationError::Tls(_)), "{refused}");
        assert!(!refused.is_transient());
    }
}
