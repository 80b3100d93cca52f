//! A cmd-ipc registry written with the Rust implementation (`coralstack-cmd-ipc`), wired to
//! stdin/stdout as spec-v1 JSON lines, with the Python side as its router (channel
//! "python"). Logs go to stderr. It registers:
//!
//! * `rust.add {a, b}` -> a + b, `rust.echo` -> the request;
//! * `_rust.secret` (private: must never be reachable from Python);
//! * `rust.call {command, request}` -> calls any command through its router and returns the
//!   result (errors come back with their code);
//! * `rust.emit {event_id, payload}` -> emits an event;
//! * `rust.events` -> every event it received, in order, as `[{event_id, payload}]`;
//! * `rust.register {id}` -> tries to register a command `id`; answers `{ok, error?}`;
//! * `rust.sleep {ms}` -> answers after `ms`; `rust.exit {code}` -> exits without answering.
//!
//! Once registered it emits `rust.ready {commands}`. It exits when stdin closes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coralstack_cmd_ipc::{
    BoxedDynCommand, ChannelError, CommandChannel, CommandError, CommandRegistry, Config,
    DynCommand, DynEvent, Message,
};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Spec-v1 JSON lines over this process's stdin and stdout.
struct StdioChannel {
    id: String,
    out: mpsc::UnboundedSender<String>,
    inbound: tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>,
    closed: AtomicBool,
}

impl StdioChannel {
    fn new(id: &str) -> Arc<Self> {
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        let (in_tx, in_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            let mut stdout = tokio::io::stdout();
            while let Some(mut line) = out_rx.recv().await {
                line.push('\n');
                if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err()
                {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => match serde_json::from_str::<Message>(&line) {
                        Ok(msg) => {
                            if in_tx.send(msg).is_err() {
                                break;
                            }
                        }
                        Err(e) => eprintln!("rust-peer: rejected line ({e}): {line:.200}"),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("rust-peer: stdin failed: {e}");
                        break;
                    }
                }
            }
        });
        Arc::new(Self {
            id: id.to_string(),
            out,
            inbound: tokio::sync::Mutex::new(in_rx),
            closed: AtomicBool::new(false),
        })
    }
}

impl CommandChannel for StdioChannel {
    fn id(&self) -> &str {
        &self.id
    }

    fn start(&self) -> BoxFuture<'_, Result<(), ChannelError>> {
        Box::pin(async { Ok(()) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closed.store(true, Ordering::SeqCst);
        })
    }

    fn send(&self, msg: Message) -> Result<(), ChannelError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(ChannelError::Closed);
        }
        let line = serde_json::to_string(&msg).map_err(|e| ChannelError::Send(e.to_string()))?;
        self.out
            .send(line)
            .map_err(|e| ChannelError::Send(e.to_string()))
    }

    fn recv(&self) -> BoxFuture<'_, Option<Message>> {
        Box::pin(async move {
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            self.inbound.lock().await.recv().await
        })
    }
}

fn invalid(command_id: &str, message: &str) -> CommandError {
    CommandError::InvalidRequest {
        command_id: command_id.to_string(),
        message: message.to_string(),
    }
}

fn field_i64(req: &Value, command_id: &str, name: &str) -> Result<i64, CommandError> {
    req.get(name)
        .and_then(Value::as_i64)
        .ok_or_else(|| invalid(command_id, &format!("'{name}' must be an integer")))
}

fn field_str(req: &Value, command_id: &str, name: &str) -> Result<String, CommandError> {
    req.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| invalid(command_id, &format!("'{name}' must be a string")))
}

fn commands(registry: &CommandRegistry, events: &Arc<Mutex<Vec<Value>>>) -> Vec<BoxedDynCommand> {
    let add = DynCommand::boxed("rust.add", |req: Value| async move {
        let a = field_i64(&req, "rust.add", "a")?;
        let b = field_i64(&req, "rust.add", "b")?;
        Ok(json!(a + b))
    })
    .description("Adds two integers (Rust)")
    .request_schema(json!({
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]
    }))
    .response_schema(json!({"type": "integer"}));
    let echo = DynCommand::boxed("rust.echo", |req: Value| async move { Ok(req) })
        .description("Returns its request (Rust)");
    let secret = DynCommand::boxed("_rust.secret", |_req: Value| async move {
        Ok(json!("private to the Rust registry"))
    });
    let reg = registry.clone();
    let call = DynCommand::boxed("rust.call", move |req: Value| {
        let reg = reg.clone();
        async move {
            let command = field_str(&req, "rust.call", "command")?;
            let request = req.get("request").cloned().unwrap_or(json!({}));
            reg.execute_dyn(&command, request).await
        }
    })
    .description("Calls any command through the router (Rust)");
    let reg = registry.clone();
    let emit = DynCommand::boxed("rust.emit", move |req: Value| {
        let reg = reg.clone();
        async move {
            let event_id = field_str(&req, "rust.emit", "event_id")?;
            let payload = req.get("payload").cloned().unwrap_or(Value::Null);
            reg.emit(DynEvent::new(event_id, payload))?;
            Ok(json!(true))
        }
    });
    let seen = events.clone();
    let list_events = DynCommand::boxed("rust.events", move |_req: Value| {
        let seen = seen.clone();
        async move { Ok(Value::Array(seen.lock().unwrap().clone())) }
    });
    let reg = registry.clone();
    let register = DynCommand::boxed("rust.register", move |req: Value| {
        let reg = reg.clone();
        async move {
            let id = field_str(&req, "rust.register", "id")?;
            let cmd = DynCommand::boxed(id.clone(), |_req: Value| async move { Ok(json!("rust")) });
            Ok(match reg.register_command(cmd).await {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            })
        }
    });
    let sleep = DynCommand::boxed("rust.sleep", |req: Value| async move {
        let ms = field_i64(&req, "rust.sleep", "ms")?;
        tokio::time::sleep(Duration::from_millis(ms.max(0) as u64)).await;
        Ok(json!(ms))
    });
    let exit = DynCommand::boxed("rust.exit", |req: Value| async move {
        let code = req.get("code").and_then(Value::as_i64).unwrap_or(3);
        eprintln!("rust-peer: exiting with code {code} as asked");
        std::process::exit(code as i32);
    });
    vec![
        add,
        echo,
        secret,
        call,
        emit,
        list_events,
        register,
        sleep,
        exit,
    ]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let router = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "python".to_string());
    let registry = CommandRegistry::new(Config {
        id: Some("rust".to_string()),
        router_channel: Some(router.clone()),
        ..Config::default()
    });
    let events: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    for event_id in ["py.ping", "shared.news", "_py.private"] {
        let seen = events.clone();
        let _ = registry.on_dyn(event_id, move |payload: Value| {
            seen.lock()
                .unwrap()
                .push(json!({"event_id": event_id, "payload": payload}));
        });
    }
    let channel = StdioChannel::new(&router);
    let pump = match registry.register_channel(channel).await {
        Ok(pump) => tokio::spawn(pump),
        Err(e) => {
            eprintln!("rust-peer: cannot attach the stdio channel: {e}");
            std::process::exit(2);
        }
    };
    let mut registered = Vec::new();
    for cmd in commands(&registry, &events) {
        let id = coralstack_cmd_ipc::Command::id(&cmd).to_string();
        match registry.register_command(cmd).await {
            Ok(()) => registered.push(id),
            Err(e) => eprintln!("rust-peer: registering {id} failed: {e}"),
        }
    }
    if let Err(e) = registry.emit(DynEvent::new("rust.ready", json!({"commands": registered}))) {
        eprintln!("rust-peer: emitting rust.ready failed: {e}");
    }
    let _ = pump.await;
    eprintln!("rust-peer: stdin closed, exiting");
}
