//! The CLI's side of the admin socket: connect, send one request line, read one bounded
//! response line within a timeout.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::{
    ControlError,
    protocol::{MAX_RESPONSE_LINE, Request, Response},
};

/// Sends `request` to the agent at `socket` and returns its (successful) response; an
/// error response becomes [`ControlError::Refused`]. `timeout` bounds the wait for the
/// answer (a reload is waited for).
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let unreachable = |source: std::io::Error| ControlError::Unreachable {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(unreachable)?;
    stream
        .write_all(request.to_line().as_bytes())
        .map_err(unreachable)?;
    let mut line = Vec::new();
    BufReader::new(&stream)
        .take(MAX_RESPONSE_LINE as u64)
        .read_until(b'\n', &mut line)
        .map_err(unreachable)?;
    if line.is_empty() {
        return Err(ControlError::BadResponse {
            reason: "the agent closed the connection without answering".into(),
        });
    }
    let response = Response::parse(&line)?;
    match (&response.error, response.ok) {
        (Some(e), _) => Err(ControlError::Refused {
            path: socket.to_owned(),
            kind: e.kind.clone(),
            message: e.message.clone(),
        }),
        (None, false) => Err(ControlError::BadResponse {
            reason: "ok is false without an error".into(),
        }),
        (None, true) => Ok(response),
    }
}
