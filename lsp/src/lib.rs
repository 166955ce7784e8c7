//! The language server: `recipec lsp` speaks the Language Server Protocol over stdio.
//!
//! Input: JSON-RPC requests and notifications from an editor. Output: diagnostics (from the
//! same checker as `recipec check`), hovers with dtypes and shapes, definitions (into the
//! embedded standard library, served as read-only files in a cache directory), completion,
//! formatting (the `recipec fmt` formatter) and document symbols. Depends on `lang` only;
//! never links the compiler back ends, the runtime or CUDA. Start reading at [`run`].
//!
//! Positions are UTF-16 code units, as the protocol's default requires. Every request on
//! any text answers or returns an error: handlers run under `catch_unwind`, so a bug in one
//! request never takes the server down.

mod handlers;
mod text;

pub use handlers::Server;

use lsp_server::{Connection, Message, Response};

/// Runs the server on stdin/stdout until the client sends `exit`.
pub fn run() -> Result<(), String> {
    let (connection, io_threads) = Connection::stdio();
    let served = serve(connection);
    // Let the writer thread flush everything that was answered. A client that closes the
    // pipes right after `shutdown` (as editors do on exit) is a normal end, not an error.
    let joined = io_threads.join();
    match (served, joined) {
        (Ok(()), _) => Ok(()),
        (Err(e), _) => Err(e),
    }
}

/// Serves one connection (also used by tests with an in-memory connection).
pub fn serve(connection: Connection) -> Result<(), String> {
    let (id, _client_capabilities) = connection.initialize_start().map_err(|e| e.to_string())?;
    let result = serde_json::json!({
        "capabilities": handlers::capabilities(),
        "serverInfo": { "name": "recipec", "version": env!("CARGO_PKG_VERSION") },
    });
    connection.initialize_finish(id, result).map_err(|e| e.to_string())?;
    let mut server = Server::new();
    for msg in &connection.receiver {
        match msg {
            Message::Request(req) => {
                match connection.handle_shutdown(&req) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {}
                    // The client closed the connection instead of sending `exit`.
                    Err(_) if req.method == "shutdown" => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
                let id = req.id.clone();
                let method = req.method.clone();
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.request(&req.method, req.params)));
                let resp = match result {
                    Ok(Ok(value)) => Response::new_ok(id, value),
                    Ok(Err(msg)) => Response::new_err(id, lsp_server::ErrorCode::InvalidParams as i32, msg),
                    Err(_) => Response::new_err(
                        id,
                        lsp_server::ErrorCode::InternalError as i32,
                        format!("this is a bug in recipec: the `{method}` handler failed"),
                    ),
                };
                connection.sender.send(Message::Response(resp)).map_err(|e| e.to_string())?;
            }
            Message::Notification(n) => {
                let out =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.notification(&n.method, n.params)));
                if let Ok(notes) = out {
                    for note in notes {
                        connection.sender.send(Message::Notification(note)).map_err(|e| e.to_string())?;
                    }
                }
            }
            Message::Response(_) => {}
        }
        // Debouncing: diagnostics are computed once the queue is empty, so a burst of edits
        // (typing) is analysed once, for its last state.
        if connection.receiver.is_empty() {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.flush()));
            if let Ok(notes) = out {
                for note in notes {
                    connection.sender.send(Message::Notification(note)).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    Ok(())
}
