//! One test per routing rule. Routers are driven directly, or joined back to back.

use super::*;
use crate::ids::SeededIds;

const SEC: Micros = 1_000_000;

/// Ids of this registry's own messages: seeded per registry id, so that two routers joined
/// back to back never emit the same id (events are deduplicated by it).
fn ids_for(id: &str) -> Box<dyn IdSource> {
    let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    Box::new(SeededIds::new(seed))
}

thread_local! {
    static PEER_IDS: std::cell::RefCell<SeededIds> =
        std::cell::RefCell::new(SeededIds::new(0x7065_6572));
}

/// A message id as a peer would choose it.
fn new_id() -> String {
    PEER_IDS.with(|ids| ids.borrow_mut().next_id())
}

fn router(id: &str, parent: Option<&str>) -> Router {
    let mut c = Config::new(id);
    c.router_channel = parent.map(str::to_string);
    let ids = ids_for(id);
    Router::new(c, ids)
}

fn with_channels(id: &str, parent: Option<&str>, channels: &[&str]) -> Router {
    let mut r = router(id, parent);
    for c in channels {
        r.add_channel(c, Encoding::Json).unwrap();
    }
    // Discard the list requests sent on attach.
    let acts = r.take_actions();
    assert!(acts.iter().all(|a| matches!(
        a,
        Action::Send {
            message: Message::ListRequest { .. },
            ..
        }
    )));
    r
}

fn sends(acts: &[Action]) -> Vec<(String, Message)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send { channel, message } => Some((channel.to_string(), message.clone())),
            _ => None,
        })
        .collect()
}

fn only_send(acts: &[Action]) -> (String, Message) {
    let s = sends(acts);
    assert_eq!(s.len(), 1, "expected one send, got {acts:#?}");
    s.into_iter().next().unwrap()
}

fn call_done(acts: &[Action], call: u64) -> ExecResult {
    acts.iter()
        .find_map(|a| match a {
            Action::CallDone { call: c, result } if *c == call => Some(result.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no CallDone for {call} in {acts:#?}"))
}

fn reg_done(acts: &[Action], call: u64) -> Result<(), ExecError> {
    acts.iter()
        .find_map(|a| match a {
            Action::RegisterDone { call: c, result } if *c == call => Some(result.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no RegisterDone for {call} in {acts:#?}"))
}

fn register(r: &mut Router, from: &str, cmd: &str) -> Vec<Action> {
    r.handle_message(
        from,
        Message::RegisterRequest {
            id: new_id(),
            command: CommandDef::new(cmd),
        },
        0,
    )
    .unwrap();
    r.take_actions()
}

fn ok_payload(v: &str) -> ExecResult {
    Ok(Some(Payload::json(v)))
}

fn exec_req(cmd: &str) -> Message {
    Message::ExecuteRequest {
        id: new_id(),
        command_id: cmd.to_string(),
        request: Some(Payload::json(r#"{"a":1}"#)),
    }
}

#[test]
fn new_channel_gets_a_list_request() {
    let mut r = router("main", None);
    r.add_channel("w", Encoding::Json).unwrap();
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "w");
    assert!(matches!(m, Message::ListRequest { .. }));
    assert!(r.add_channel("w", Encoding::Json).is_err());
}

#[test]
fn routing_priority_local_then_advertised_then_router_then_not_found() {
    let mut r = with_channels("mid", Some("root"), &["root", "peer"]);
    r.register_local(CommandDef::new("_x.local"), 7, 0);
    r.handle_message(
        "peer",
        Message::ListResponse {
            id: new_id(),
            thid: "t".into(),
            commands: vec![CommandDef::new("a.cmd")],
        },
        0,
    )
    .unwrap();
    r.take_actions();

    // 1. local
    r.execute("_x.local", None, None, 0);
    let acts = r.take_actions();
    assert!(matches!(acts[0], Action::RunHandler { handler: 7, .. }));
    // 2. advertised channel
    r.execute("a.cmd", None, None, 0);
    assert_eq!(only_send(&r.take_actions()).0, "peer");
    // 3. router
    r.execute("b.cmd", None, None, 0);
    assert_eq!(only_send(&r.take_actions()).0, "root");
    // 4. not_found without a router
    let mut root = with_channels("root", None, &["w"]);
    let call = root.execute("b.cmd", None, None, 0);
    let err = call_done(&root.take_actions(), call).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("b.cmd"));
}

#[test]
fn local_registration_escalates_and_completes_on_ack() {
    let mut r = with_channels("w", Some("root"), &["root"]);
    let call = r.register_local(CommandDef::new("math.add"), 1, 0);
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "root");
    let Message::RegisterRequest { id, command } = m else {
        panic!()
    };
    assert_eq!(command.id, "math.add");
    assert!(r.list_commands().is_empty(), "visible before the ack");
    r.handle_message(
        "root",
        Message::RegisterResponse {
            id: new_id(),
            thid: id,
            response: Ok(()),
        },
        0,
    )
    .unwrap();
    assert_eq!(reg_done(&r.take_actions(), call), Ok(()));
    assert_eq!(r.list_commands()[0].id, "math.add");
}

#[test]
fn rejected_escalation_is_duplicate_command() {
    let mut r = with_channels("w", Some("root"), &["root"]);
    let call = r.register_local(CommandDef::new("math.add"), 1, 0);
    let (_, m) = only_send(&r.take_actions());
    r.handle_message(
        "root",
        Message::RegisterResponse {
            id: new_id(),
            thid: m.id().to_string(),
            response: Err(RegisterError::DuplicateCommand),
        },
        0,
    )
    .unwrap();
    let err = reg_done(&r.take_actions(), call).unwrap_err();
    assert_eq!(err.code, ErrorCode::DuplicateCommand);
    assert!(r.list_commands().is_empty());
}

#[test]
fn duplicate_from_other_channel_rejected_same_channel_allowed() {
    let mut r = with_channels("main", None, &["w1", "w2"]);
    let (_, m) = only_send(&register(&mut r, "w1", "math.add"));
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Ok(()),
            ..
        }
    ));
    let (to, m) = only_send(&register(&mut r, "w2", "math.add"));
    assert_eq!(to, "w2");
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Err(RegisterError::DuplicateCommand),
            ..
        }
    ));
    // Restarted worker re-registers from the same channel.
    let (_, m) = only_send(&register(&mut r, "w1", "math.add"));
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Ok(()),
            ..
        }
    ));
    // Local registration of a channel-owned id is a duplicate naming the owner.
    let call = r.register_local(CommandDef::new("math.add"), 1, 0);
    let err = reg_done(&r.take_actions(), call).unwrap_err();
    assert_eq!(err.code, ErrorCode::DuplicateCommand);
    assert!(err.message.contains("w1"));
}

#[test]
fn list_response_imports_first_owner_wins_never_over_local() {
    let mut r = with_channels("main", None, &["a", "b"]);
    r.register_local(CommandDef::new("mine"), 1, 0);
    for ch in ["a", "b"] {
        r.handle_message(
            ch,
            Message::ListResponse {
                id: new_id(),
                thid: "x".into(),
                commands: vec![
                    CommandDef::new("mine"),
                    CommandDef::new("shared"),
                    CommandDef::new("_hidden"),
                ],
            },
            0,
        )
        .unwrap();
    }
    assert_eq!(r.route_of("mine").as_deref(), Some("local"));
    assert_eq!(r.route_of("shared").as_deref(), Some("a"));
    assert_eq!(r.route_of("_hidden"), None);
}

#[test]
fn advertised_by_peer_beats_learned_from_router() {
    let mut r = with_channels("w2", Some("main"), &["main", "w3"]);
    for ch in ["main", "w3"] {
        r.handle_message(
            ch,
            Message::ListResponse {
                id: new_id(),
                thid: "x".into(),
                commands: vec![CommandDef::new("data.query")],
            },
            0,
        )
        .unwrap();
    }
    assert_eq!(r.route_of("data.query").as_deref(), Some("w3"));
}

#[test]
fn multi_hop_response_routing_through_three_levels() {
    // root <- mid <- leaf, joined back to back by a tiny loop.
    let mut routers = vec![
        with_channels("root", None, &["mid"]),
        with_channels("mid", Some("root"), &["root", "leaf"]),
        with_channels("leaf", Some("mid"), &["mid"]),
    ];
    let index = |name: &str| ["root", "mid", "leaf"].iter().position(|n| *n == name);
    // Channel names equal the peer's registry name in this topology.
    fn pump(routers: &mut [Router], index: &dyn Fn(&str) -> Option<usize>) -> Vec<Action> {
        let mut local = Vec::new();
        loop {
            let mut moved = false;
            for i in 0..routers.len() {
                let me = routers[i].config().id.clone();
                for a in routers[i].take_actions() {
                    match a {
                        Action::Send { channel, message } => {
                            let j = index(&channel).unwrap();
                            // Round-trip the codec too.
                            let bytes = codec::encode(&message, Encoding::Json).unwrap();
                            routers[j].handle_frame(&me, &bytes, 0).unwrap();
                            moved = true;
                        }
                        Action::RunHandler { job, request, .. } => {
                            assert_eq!(me, "leaf");
                            assert_eq!(request.unwrap().data, br#"{"a":1}"#);
                            routers[i].complete_job(job, ok_payload("42")).unwrap();
                            moved = true;
                        }
                        other => local.push(other),
                    }
                }
            }
            if !moved {
                return local;
            }
        }
    }
    let call = routers[2].register_local(CommandDef::new("leaf.cmd"), 9, 0);
    let acts = pump(&mut routers, &index);
    assert_eq!(reg_done(&acts, call), Ok(()));
    assert_eq!(routers[0].route_of("leaf.cmd").as_deref(), Some("mid"));
    assert_eq!(routers[1].route_of("leaf.cmd").as_deref(), Some("leaf"));

    let call = routers[0].execute("leaf.cmd", Some(Payload::json(r#"{"a":1}"#)), None, 0);
    let acts = pump(&mut routers, &index);
    assert_eq!(call_done(&acts, call), ok_payload("42"));
    assert_eq!(routers[1].stats().forwarded, 1);
    assert_eq!(routers[1].stats().pending_forwards, 0);

    // And a leaf calling a root command: escalation through the router chain.
    routers[0].register_local(CommandDef::new("root.cmd"), 3, 0);
    routers[0].take_actions();
    let call = routers[2].execute("root.cmd", None, None, 0);
    let mut acts = Vec::new();
    for _ in 0..4 {
        // Answer the root's handler run by hand.
        for i in 0..3 {
            let me = routers[i].config().id.clone();
            for a in routers[i].take_actions() {
                match a {
                    Action::Send { channel, message } => {
                        let j = index(&channel).unwrap();
                        routers[j].handle_message(&me, message, 0).unwrap();
                    }
                    Action::RunHandler { job, .. } => routers[i]
                        .complete_job(job, ok_payload("\"root\""))
                        .unwrap(),
                    other => acts.push(other),
                }
            }
        }
    }
    assert_eq!(call_done(&acts, call), ok_payload("\"root\""));
}

#[test]
fn registration_escalates_through_a_middle_registry() {
    let mut mid = with_channels("mid", Some("root"), &["root", "leaf"]);
    let child_req = new_id();
    mid.handle_message(
        "leaf",
        Message::RegisterRequest {
            id: child_req.clone(),
            command: CommandDef::new("x.y"),
        },
        0,
    )
    .unwrap();
    let (to, up) = only_send(&mid.take_actions());
    assert_eq!(to, "root");
    assert!(
        mid.route_of("x.y").as_deref() == Some("root"),
        "not yet owned"
    );
    mid.handle_message(
        "root",
        Message::RegisterResponse {
            id: new_id(),
            thid: up.id().to_string(),
            response: Ok(()),
        },
        0,
    )
    .unwrap();
    let (to, ack) = only_send(&mid.take_actions());
    assert_eq!(to, "leaf");
    assert!(
        matches!(ack, Message::RegisterResponse { thid, response: Ok(()), .. } if thid == child_req)
    );
    assert_eq!(mid.route_of("x.y").as_deref(), Some("leaf"));
}

#[test]
fn response_accepted_only_from_target_and_only_once() {
    let mut r = with_channels("main", None, &["w1", "w2"]);
    register(&mut r, "w1", "math.add");
    let call = r.execute("math.add", None, None, 0);
    let (_, req) = only_send(&r.take_actions());
    let resp = |id: &str| Message::ExecuteResponse {
        id: new_id(),
        thid: id.to_string(),
        response: ok_payload("1"),
    };
    // Spoofed: from the wrong channel.
    r.handle_message("w2", resp(req.id()), 0).unwrap();
    let acts = r.take_actions();
    assert!(matches!(
        acts[..],
        [Action::Dropped {
            kind: DropKind::Spoofed,
            ..
        }]
    ));
    r.handle_message("w1", resp(req.id()), 0).unwrap();
    assert_eq!(call_done(&r.take_actions(), call), ok_payload("1"));
    // Duplicate.
    r.handle_message("w1", resp(req.id()), 0).unwrap();
    assert!(matches!(
        r.take_actions()[..],
        [Action::Dropped {
            kind: DropKind::Unknown,
            ..
        }]
    ));
    assert_eq!(r.stats().dropped, 2);
}

#[test]
fn forwarded_response_spoof_is_dropped() {
    let mut r = with_channels("main", None, &["a", "b", "c"]);
    register(&mut r, "b", "cmd");
    r.handle_message("a", exec_req("cmd"), 0).unwrap();
    let (_, fwd) = only_send(&r.take_actions());
    r.handle_message(
        "c",
        Message::ExecuteResponse {
            id: new_id(),
            thid: fwd.id().to_string(),
            response: ok_payload("1"),
        },
        0,
    )
    .unwrap();
    assert!(sends(&r.take_actions()).is_empty());
    assert_eq!(r.stats().pending_forwards, 1);
}

#[test]
fn loop_guard_never_forwards_back_to_sender() {
    // The router channel asks us for a command we do not have: no bounce back up.
    let mut r = with_channels("w", Some("root"), &["root"]);
    r.handle_message("root", exec_req("missing.cmd"), 0)
        .unwrap();
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "root");
    assert!(matches!(
        m,
        Message::ExecuteResponse {
            response: Err(ExecError {
                code: ErrorCode::NotFound,
                ..
            }),
            ..
        }
    ));
    // A peer that advertised a command asks us for it: not sent back to it.
    let mut r = with_channels("main", None, &["p"]);
    r.handle_message(
        "p",
        Message::ListResponse {
            id: new_id(),
            thid: "x".into(),
            commands: vec![CommandDef::new("p.cmd")],
        },
        0,
    )
    .unwrap();
    r.handle_message("p", exec_req("p.cmd"), 0).unwrap();
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "p");
    assert!(matches!(m, Message::ExecuteResponse { .. }));
    assert_eq!(r.stats().forwarded, 0);
}

#[test]
fn private_ids_never_advertised_escalated_or_executed_remotely() {
    let mut r = with_channels("w", Some("root"), &["root"]);
    let call = r.register_local(CommandDef::new("_secret"), 1, 0);
    let acts = r.take_actions();
    assert!(sends(&acts).is_empty(), "private registration escalated");
    assert_eq!(reg_done(&acts, call), Ok(()));
    r.handle_message("root", Message::ListRequest { id: new_id() }, 0)
        .unwrap();
    let (_, m) = only_send(&r.take_actions());
    assert!(matches!(m, Message::ListResponse { commands, .. } if commands.is_empty()));
    r.handle_message("root", exec_req("_secret"), 0).unwrap();
    let (_, m) = only_send(&r.take_actions());
    assert!(matches!(
        m,
        Message::ExecuteResponse {
            response: Err(ExecError {
                code: ErrorCode::NotFound,
                ..
            }),
            ..
        }
    ));
    // Locally it works.
    r.execute("_secret", None, None, 0);
    assert!(matches!(r.take_actions()[0], Action::RunHandler { .. }));
    // A private event is delivered locally only.
    r.emit_event("_audit", None, 0);
    let acts = r.take_actions();
    assert!(sends(&acts).is_empty());
    assert!(matches!(acts[..], [Action::DeliverEvent { .. }]));
}

#[test]
fn events_flood_except_origin_and_dedup() {
    let mut r = with_channels("main", None, &["a", "b", "c"]);
    let ev = Message::Event {
        id: "e1".into(),
        event_id: "user.updated".into(),
        payload: Some(Payload::json("1")),
    };
    r.handle_message("a", ev.clone(), 0).unwrap();
    let acts = r.take_actions();
    let mut targets: Vec<String> = sends(&acts).into_iter().map(|(c, _)| c).collect();
    targets.sort();
    assert_eq!(targets, ["b", "c"]);
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::DeliverEvent { .. }))
            .count(),
        1
    );
    r.handle_message("b", ev.clone(), SEC).unwrap();
    let acts = r.take_actions();
    assert!(matches!(
        acts[..],
        [Action::Dropped {
            kind: DropKind::DuplicateEvent,
            ..
        }]
    ));
    // After event_ttl the id is forgotten.
    r.handle_message("b", ev, 6 * SEC).unwrap();
    assert!(r
        .take_actions()
        .iter()
        .any(|a| matches!(a, Action::DeliverEvent { .. })));
}

#[test]
fn local_emit_same_id_on_every_channel() {
    let mut r = with_channels("main", None, &["a", "b"]);
    let id = r.emit_event("x", None, 0);
    let acts = r.take_actions();
    let s = sends(&acts);
    assert_eq!(s.len(), 2);
    assert!(s.iter().all(|(_, m)| m.id() == id));
}

#[test]
fn dedup_table_is_bounded() {
    let mut c = Config::new("main");
    c.max_dedup = 1000;
    let mut r = Router::new(c, ids_for("main"));
    r.add_channel("a", Encoding::Json).unwrap();
    for i in 0..100_000u32 {
        r.handle_message(
            "a",
            Message::Event {
                id: format!("ev-{i}"),
                event_id: "e".into(),
                payload: None,
            },
            0,
        )
        .unwrap();
        if i % 1000 == 0 {
            r.take_actions();
        }
    }
    assert_eq!(r.stats().dedup_entries, 1000);
}

#[test]
fn timeouts_fire_without_other_traffic() {
    let mut r = with_channels("main", None, &["w"]);
    register(&mut r, "w", "slow");
    let call = r.execute("slow", None, Some(2 * SEC), 0);
    r.take_actions();
    assert_eq!(r.next_deadline(), Some(2 * SEC));
    r.tick(SEC);
    assert!(r.take_actions().is_empty());
    r.tick(2 * SEC);
    let err = call_done(&r.take_actions(), call).unwrap_err();
    assert_eq!(err.code, ErrorCode::Timeout);
    assert_eq!(r.next_deadline(), None);
    assert_eq!(r.stats().pending, 0);
}

#[test]
fn forwarded_request_times_out_upstream() {
    let mut r = with_channels("main", None, &["a", "b"]);
    register(&mut r, "b", "cmd");
    r.handle_message("a", exec_req("cmd"), 0).unwrap();
    r.take_actions();
    r.tick(31 * SEC);
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "a");
    assert!(matches!(
        m,
        Message::ExecuteResponse {
            response: Err(ExecError {
                code: ErrorCode::Timeout,
                ..
            }),
            ..
        }
    ));
}

#[test]
fn close_drops_commands_and_fails_everything_in_flight() {
    let mut r = with_channels("main", None, &["up", "w"]);
    register(&mut r, "w", "cmd");
    let c1 = r.execute("cmd", None, None, 0);
    let c2 = r.execute("cmd", None, None, 0);
    r.handle_message("up", exec_req("cmd"), 0).unwrap();
    let (_, fwd) = sends(&r.take_actions()).pop().unwrap();
    let fwd_id = fwd.id().to_string();
    r.close_channel("w").unwrap();
    let acts = r.take_actions();
    for c in [c1, c2] {
        assert_eq!(
            call_done(&acts, c).unwrap_err().code,
            ErrorCode::ChannelDisconnected
        );
    }
    let (to, m) = only_send(&acts);
    assert_eq!(to, "up");
    assert!(matches!(
        m,
        Message::ExecuteResponse {
            response: Err(ExecError {
                code: ErrorCode::ChannelDisconnected,
                ..
            }),
            ..
        }
    ));
    assert!(r.route_of("cmd").is_none());
    assert!(r.list_commands().is_empty());
    assert_eq!(r.stats().pending, 0);
    assert_eq!(r.stats().pending_forwards, 0);
    assert_ne!(fwd_id, "");
    let call = r.execute("cmd", None, None, 0);
    assert_eq!(
        call_done(&r.take_actions(), call).unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[test]
fn close_of_router_fails_pending_local_registration() {
    let mut r = with_channels("w", Some("root"), &["root"]);
    let call = r.register_local(CommandDef::new("a.b"), 1, 0);
    r.take_actions();
    r.close_channel("root").unwrap();
    assert_eq!(
        reg_done(&r.take_actions(), call).unwrap_err().code,
        ErrorCode::ChannelDisconnected
    );
}

#[test]
fn reply_to_closed_channel_is_dropped() {
    let mut r = with_channels("main", None, &["a"]);
    r.register_local(CommandDef::new("cmd"), 1, 0);
    r.take_actions();
    r.handle_message("a", exec_req("cmd"), 0).unwrap();
    let Action::RunHandler { job, .. } = r.take_actions()[0].clone() else {
        panic!()
    };
    r.close_channel("a").unwrap();
    r.complete_job(job, ok_payload("1")).unwrap();
    assert!(matches!(
        r.take_actions()[..],
        [Action::Dropped {
            kind: DropKind::Undeliverable,
            ..
        }]
    ));
    assert!(r.complete_job(job, ok_payload("1")).is_err());
}

#[test]
fn pending_table_is_bounded() {
    let mut c = Config::new("main");
    c.max_pending = 10;
    let mut r = Router::new(c, ids_for("main"));
    r.add_channel("w", Encoding::Json).unwrap();
    register(&mut r, "w", "cmd");
    let calls: Vec<u64> = (0..20).map(|_| r.execute("cmd", None, None, 0)).collect();
    let acts = r.take_actions();
    assert_eq!(sends(&acts).len(), 10);
    for c in &calls[10..] {
        assert_eq!(
            call_done(&acts, *c).unwrap_err().code,
            ErrorCode::InternalError
        );
    }
}

#[test]
fn garbage_frame_is_dropped_and_bad_execute_answered() {
    let mut r = with_channels("main", None, &["w"]);
    assert!(r.handle_frame("w", b"\x00garbage", 0).is_err());
    assert!(sends(&r.take_actions()).is_empty());
    let bad = br#"{"id":"r1","type":"execute.command.request","commandId":"x","request":[1]}"#;
    assert!(r.handle_frame("w", bad, 0).is_err());
    let (_, m) = only_send(&r.take_actions());
    assert!(
        matches!(m, Message::ExecuteResponse { thid, response: Err(ExecError { code: ErrorCode::InvalidRequest, .. }), .. } if thid == "r1")
    );
    assert_eq!(r.stats().dropped, 2);
}

#[test]
fn list_request_answers_subtree_not_what_was_learned() {
    let mut r = with_channels("mid", None, &["child", "peer", "asker"]);
    r.register_local(CommandDef::new("local.a"), 1, 0);
    register(&mut r, "child", "child.b");
    r.handle_message(
        "peer",
        Message::ListResponse {
            id: new_id(),
            thid: "x".into(),
            commands: vec![CommandDef::new("peer.c")],
        },
        0,
    )
    .unwrap();
    r.take_actions();
    r.handle_message("asker", Message::ListRequest { id: "q".into() }, 0)
        .unwrap();
    let (_, m) = only_send(&r.take_actions());
    let Message::ListResponse { commands, .. } = m else {
        panic!()
    };
    let ids: Vec<&str> = commands.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["child.b", "local.a"]);
}

#[test]
fn not_found_suggests_close_matches() {
    let mut r = with_channels("main", None, &[]);
    r.register_local(CommandDef::new("calc.add"), 1, 0);
    r.take_actions();
    let call = r.execute("calc.ad", None, None, 0);
    let err = call_done(&r.take_actions(), call).unwrap_err();
    assert!(
        err.message.contains("did you mean calc.add"),
        "{}",
        err.message
    );
}

#[test]
fn local_handler_calls_time_out_and_late_completion_is_ignored() {
    let mut r = with_channels("main", None, &[]);
    r.register_local(CommandDef::new("stuck"), 1, 0);
    r.take_actions();
    let call = r.execute("stuck", None, Some(SEC), 0);
    let Action::RunHandler { job, .. } = r.take_actions()[0].clone() else {
        panic!()
    };
    assert_eq!(r.next_deadline(), Some(SEC));
    r.tick(SEC);
    assert_eq!(
        call_done(&r.take_actions(), call).unwrap_err().code,
        ErrorCode::Timeout
    );
    assert_eq!(r.stats().pending, 0);
    assert!(r.complete_job(job, ok_payload("1")).is_err());
    // A job completed in time clears its deadline.
    let call = r.execute("stuck", None, Some(SEC), 0);
    let Action::RunHandler { job, .. } = r.take_actions()[0].clone() else {
        panic!()
    };
    r.complete_job(job, ok_payload("1")).unwrap();
    assert_eq!(call_done(&r.take_actions(), call), ok_payload("1"));
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn values_json_cannot_carry_fail_the_decision_not_the_send() {
    let mut r = router("main", None);
    r.add_channel("j", Encoding::Json).unwrap();
    r.add_channel("m", Encoding::Msgpack).unwrap();
    r.take_actions();
    register(&mut r, "j", "json.cmd");
    // {"b": bin(\x00\x01)} in msgpack
    let bin_req = Payload::new(
        Encoding::Msgpack,
        vec![0x81, 0xa1, b'b', 0xc4, 0x02, 0x00, 0x01],
    );
    let call = r.execute("json.cmd", Some(bin_req.clone()), None, 0);
    let acts = r.take_actions();
    assert!(sends(&acts).is_empty());
    assert_eq!(
        call_done(&acts, call).unwrap_err().code,
        ErrorCode::InvalidRequest
    );
    // A plain msgpack request is transcoded for the JSON channel at decision time.
    let ok_req = Payload::new(Encoding::Msgpack, vec![0x81, 0xa1, b'a', 0x01]);
    r.execute("json.cmd", Some(ok_req), None, 0);
    let (_, m) = only_send(&r.take_actions());
    let Message::ExecuteRequest { request, .. } = m else {
        panic!()
    };
    assert_eq!(request.unwrap(), Payload::json(r#"{"a":1}"#));
    // An event with bytes reaches the msgpack channel and is dropped for the JSON one.
    r.emit_event("e", Some(bin_req), 0);
    let acts = r.take_actions();
    let s = sends(&acts);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, "m");
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Dropped {
            kind: DropKind::Unencodable,
            ..
        }
    )));
}

#[test]
fn local_handler_runs_count_toward_the_cap() {
    // Found by the router_ops fuzzer: local calls to a local handler were not capped.
    let mut c = Config::new("main");
    c.max_pending = 3;
    let mut r = Router::new(c, ids_for("main"));
    r.register_local(CommandDef::new("slow"), 1, 0);
    r.take_actions();
    let calls: Vec<u64> = (0..5).map(|_| r.execute("slow", None, None, 0)).collect();
    let acts = r.take_actions();
    let runs = acts
        .iter()
        .filter(|a| matches!(a, Action::RunHandler { .. }))
        .count();
    assert_eq!(runs, 3);
    for c in &calls[3..] {
        assert_eq!(
            call_done(&acts, *c).unwrap_err().code,
            ErrorCode::InternalError
        );
    }
    assert_eq!(r.stats().jobs, 3);
}

#[test]
fn reannounce_registers_the_subtree_again_with_a_router_that_came_back() {
    let mut r = with_channels("w", Some("root"), &["root", "child"]);
    // A local command and a child's, both acknowledged by the router.
    let call = r.register_local(CommandDef::new("w.local"), 1, 0);
    for (to, m) in sends(&r.take_actions()) {
        let Message::RegisterRequest { id, .. } = m else {
            panic!()
        };
        assert_eq!(to, "root");
        let resp = Message::RegisterResponse {
            id: new_id(),
            thid: id,
            response: Ok(()),
        };
        r.handle_message("root", resp, 0).unwrap();
    }
    assert_eq!(reg_done(&r.take_actions(), call), Ok(()));
    let acts = register(&mut r, "child", "c.cmd");
    let (_, Message::RegisterRequest { id, .. }) = only_send(&acts) else {
        panic!()
    };
    let resp = Message::RegisterResponse {
        id: new_id(),
        thid: id,
        response: Ok(()),
    };
    r.handle_message("root", resp, 0).unwrap();
    r.take_actions();
    r.register_local(CommandDef::new("_private"), 2, 0);
    r.take_actions();

    // Without a router channel nothing is sent.
    r.close_channel("root").unwrap();
    r.take_actions();
    assert_eq!(r.reannounce(0), 0);
    r.add_channel("root", Encoding::Json).unwrap();
    r.take_actions();

    assert_eq!(r.reannounce(0), 2);
    let sent = sends(&r.take_actions());
    let ids: Vec<&str> = sent
        .iter()
        .map(|(to, m)| {
            assert_eq!(to, "root");
            match m {
                Message::RegisterRequest { command, .. } => command.id.as_str(),
                other => panic!("unexpected {other:?}"),
            }
        })
        .collect();
    assert_eq!(
        ids,
        ["c.cmd", "w.local"],
        "public subtree, sorted, no private id"
    );

    // A rejection is reported and the local route kept; an ack is silent.
    let thids: Vec<String> = sent
        .iter()
        .map(|(_, m)| match m {
            Message::RegisterRequest { id, .. } => id.clone(),
            _ => unreachable!(),
        })
        .collect();
    let reject = Message::RegisterResponse {
        id: new_id(),
        thid: thids[1].clone(),
        response: Err(RegisterError::DuplicateCommand),
    };
    r.handle_message("root", reject, 0).unwrap();
    let acts = r.take_actions();
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Dropped { kind: DropKind::Rejected, reason, .. } if reason.contains("w.local")
        )),
        "{acts:#?}"
    );
    assert_eq!(r.route_of("w.local").as_deref(), Some("local"));
    // An acknowledgement is silent, for a local route and for a child's.
    assert_eq!(r.reannounce(0), 2);
    for (_, m) in sends(&r.take_actions()) {
        let Message::RegisterRequest { id, .. } = m else {
            panic!()
        };
        let ack = Message::RegisterResponse {
            id: new_id(),
            thid: id,
            response: Ok(()),
        };
        r.handle_message("root", ack, 0).unwrap();
    }
    let acts = r.take_actions();
    assert!(acts.is_empty(), "{acts:#?}");
    assert_eq!(r.route_of("c.cmd").as_deref(), Some("child"));
    // The other one is never acknowledged: its timeout is reported too.
    r.tick(3600 * SEC);
    let acts = r.take_actions();
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Dropped { kind: DropKind::Rejected, reason, .. } if reason.contains("c.cmd")
        )),
        "{acts:#?}"
    );
}

/// Feeds one scripted run to a router seeded with `seed` and returns every action it queued.
/// Peers answer with ids taken from the router's own output, as real peers would.
fn scripted_run(seed: u64) -> Vec<Action> {
    let mut peer = SeededIds::new(99);
    let mut c = Config::new("mid");
    c.router_channel = Some("up".into());
    let mut r = Router::new(c, Box::new(SeededIds::new(seed)));
    let mut log = Vec::new();
    let mut step = |r: &mut Router| {
        let acts = r.take_actions();
        log.extend(acts.iter().cloned());
        acts
    };
    let sent_id = |acts: &[Action], to: &str| -> String {
        let (_, m) = sends(acts).into_iter().find(|(c, _)| c == to).unwrap();
        m.id().to_string()
    };
    for (name, enc) in [
        ("up", Encoding::Json),
        ("a", Encoding::Msgpack),
        ("b", Encoding::Json),
    ] {
        r.add_channel(name, enc).unwrap();
    }
    step(&mut r);
    // A child registers a command: escalated to "up", acknowledged, acknowledged down.
    let command = CommandDef::new("calc.add");
    let id = peer.next_id();
    r.handle_message("b", Message::RegisterRequest { id, command }, 0)
        .unwrap();
    let acts = step(&mut r);
    let thid = sent_id(&acts, "up");
    let ack = Message::RegisterResponse {
        id: peer.next_id(),
        thid,
        response: Ok(()),
    };
    r.handle_message("up", ack, 1).unwrap();
    step(&mut r);
    // A local registration, acknowledged too.
    r.register_local(CommandDef::new("local.echo"), 7, 2);
    let acts = step(&mut r);
    let thid = sent_id(&acts, "up");
    let ack = Message::RegisterResponse {
        id: peer.next_id(),
        thid,
        response: Ok(()),
    };
    r.handle_message("up", ack, 3).unwrap();
    step(&mut r);
    // A forwarded request and its response; a second one cut off by the channel's close.
    for _ in 0..2 {
        let request = Message::ExecuteRequest {
            id: peer.next_id(),
            command_id: "calc.add".into(),
            request: Some(Payload::json(r#"{"a":1}"#)),
        };
        r.handle_message("a", request, 4).unwrap();
    }
    let acts = step(&mut r);
    let forwarded: Vec<String> = sends(&acts)
        .iter()
        .map(|(_, m)| m.id().to_string())
        .collect();
    let response = Message::ExecuteResponse {
        id: peer.next_id(),
        thid: forwarded[0].clone(),
        response: Ok(Some(Payload::json("2"))),
    };
    r.handle_message("b", response, 5).unwrap();
    step(&mut r);
    r.close_channel("b").unwrap();
    step(&mut r);
    // A local call to the router that never answers (times out), a local handler run.
    r.execute("far.away", None, Some(10 * SEC), 6);
    let call = r.execute("local.echo", Some(Payload::json("{}")), None, 6);
    let acts = step(&mut r);
    let job = acts
        .iter()
        .find_map(|a| match a {
            Action::RunHandler { job, .. } => Some(*job),
            _ => None,
        })
        .unwrap();
    r.complete_job(job, Ok(None)).unwrap();
    assert!(call > 0);
    // Events both ways, a duplicate, garbage, a list request, then time passes.
    r.emit_event("tick", Some(Payload::json("1")), 7);
    let event = Message::Event {
        id: peer.next_id(),
        event_id: "tock".into(),
        payload: None,
    };
    r.handle_message("a", event.clone(), 8).unwrap();
    r.handle_message("a", event, 8).unwrap();
    let _ = r.handle_frame("up", b"{not json", 9);
    let list = Message::ListRequest { id: peer.next_id() };
    r.handle_message("a", list, 9).unwrap();
    r.tick(60 * SEC);
    step(&mut r);
    log
}

#[test]
fn a_seeded_run_replays_exactly() {
    let first = scripted_run(42);
    assert!(
        first.len() > 20,
        "the script exercises the router: {first:#?}"
    );
    assert_eq!(
        first,
        scripted_run(42),
        "same inputs, same seed: same actions"
    );
    // The ids are the source's: another seed changes them, and only them.
    let other = scripted_run(43);
    assert_ne!(first, other);
    assert_eq!(first.len(), other.len());
}

// ---------------------------------------------------------------------------------- pools

/// A root with a pool "p" of members w1..wn (each registered `calc.add`) and an outsider.
fn pool_root(n: usize) -> Router {
    let names: Vec<String> = (1..=n).map(|i| format!("w{i}")).collect();
    let mut chans: Vec<&str> = names.iter().map(String::as_str).collect();
    chans.push("other");
    let mut r = with_channels("main", None, &chans);
    for name in &names {
        r.set_pool(name, Some("p"));
        let (to, m) = only_send(&register(&mut r, name, "calc.add"));
        assert_eq!(to, *name);
        assert!(
            matches!(
                m,
                Message::RegisterResponse {
                    response: Ok(()),
                    ..
                }
            ),
            "{m:?}"
        );
    }
    r
}

/// The channel each of `n` calls of `calc.add` went to, with the request ids.
fn call_targets(r: &mut Router, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|_| {
            r.execute("calc.add", None, None, 0);
            match only_send(&r.take_actions()) {
                (to, Message::ExecuteRequest { id, .. }) => (to, id),
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

fn answer(r: &mut Router, from: &str, thid: &str) -> Vec<Action> {
    r.handle_message(
        from,
        Message::ExecuteResponse {
            id: new_id(),
            thid: thid.to_string(),
            response: ok_payload("1"),
        },
        0,
    )
    .unwrap();
    r.take_actions()
}

#[test]
fn pool_members_share_a_command_and_an_outsider_is_still_a_duplicate() {
    let mut r = pool_root(3);
    let (_, m) = only_send(&register(&mut r, "other", "calc.add"));
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Err(RegisterError::DuplicateCommand),
            ..
        }
    ));
    // A member of another pool is an outsider too.
    r.set_pool("other", Some("q"));
    let (_, m) = only_send(&register(&mut r, "other", "calc.add"));
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Err(_),
            ..
        }
    ));
    // And a pool cannot take a command owned by a single channel.
    r.set_pool("other", None);
    register(&mut r, "other", "solo.cmd");
    let (_, m) = only_send(&register(&mut r, "w1", "solo.cmd"));
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Err(_),
            ..
        }
    ));
    assert_eq!(r.pool_of("w2"), Some("p"));
    assert_eq!(
        r.list_commands()
            .iter()
            .filter(|c| c.id == "calc.add")
            .count(),
        1
    );
}

#[test]
fn pool_ties_go_round_robin_and_route_of_names_the_next_member() {
    let mut r = pool_root(3);
    let mut seen = Vec::new();
    for _ in 0..6 {
        let next = r.route_of("calc.add").unwrap();
        let (to, id) = call_targets(&mut r, 1).remove(0);
        assert_eq!(next, to, "route_of must name the member execute chooses");
        answer(&mut r, &to, &id);
        seen.push(to);
    }
    assert_eq!(seen, ["w1", "w2", "w3", "w1", "w2", "w3"]);
}

#[test]
fn pool_chooses_the_member_with_fewest_calls_in_flight() {
    let mut r = pool_root(3);
    let first = call_targets(&mut r, 3); // one in flight on each
    assert_eq!(
        first.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
        ["w1", "w2", "w3"]
    );
    // w2 answers: it is the least loaded now, whatever the round-robin says.
    answer(&mut r, "w2", &first[1].1);
    assert_eq!(call_targets(&mut r, 1)[0].0, "w2");
    let stats = r.stats();
    let load: Vec<(String, u64, u64)> = stats
        .channels
        .iter()
        .map(|(c, s)| (c.to_string(), s.requests, s.in_flight))
        .collect();
    assert!(load.contains(&("w1".into(), 1, 1)), "{load:?}");
    assert!(load.contains(&("w2".into(), 2, 1)), "{load:?}");
}

#[test]
fn pool_registers_upward_once() {
    let mut r = with_channels("mid", Some("root"), &["root", "w1", "w2"]);
    r.set_pool("w1", Some("p"));
    r.set_pool("w2", Some("p"));
    let (to, first) = only_send(&register(&mut r, "w1", "calc.add"));
    assert_eq!(to, "root");
    // The second member joins while the first registration is on its way up.
    let (to, m) = only_send(&register(&mut r, "w2", "calc.add"));
    assert_eq!(to, "w2");
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Ok(()),
            ..
        }
    ));
    let Message::RegisterRequest { id, .. } = first else {
        panic!("{first:?}")
    };
    r.handle_message(
        "root",
        Message::RegisterResponse {
            id: new_id(),
            thid: id,
            response: Ok(()),
        },
        0,
    )
    .unwrap();
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "w1");
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Ok(()),
            ..
        }
    ));
    // Both serve, and a third registration (a restarted member) is not escalated again.
    let mut targets: Vec<String> = call_targets(&mut r, 2).into_iter().map(|t| t.0).collect();
    targets.sort();
    assert_eq!(targets, ["w1", "w2"]);
    let (to, _) = only_send(&register(&mut r, "w1", "calc.add"));
    assert_eq!(to, "w1");
}

#[test]
fn a_dead_member_fails_only_its_own_calls_and_can_rejoin() {
    let mut r = pool_root(2);
    let calls: Vec<u64> = (0..2)
        .map(|_| r.execute("calc.add", None, None, 0))
        .collect();
    let sent = sends(&r.take_actions());
    assert_eq!(sent[0].0, "w1");
    r.close_channel("w1").unwrap();
    let acts = r.take_actions();
    let err = call_done(&acts, calls[0]).unwrap_err();
    assert_eq!(err.code, ErrorCode::ChannelDisconnected);
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::CallDone { call, .. } if *call == calls[1])),
        "the call on w2 must not fail"
    );
    // Nothing is retried: the next calls go to the survivor only.
    assert!(call_targets(&mut r, 3).iter().all(|(to, _)| to == "w2"));
    // The member comes back (a restart) and serves again.
    r.add_channel("w1", Encoding::Json).unwrap();
    r.take_actions();
    let (_, m) = only_send(&register(&mut r, "w1", "calc.add"));
    assert!(matches!(
        m,
        Message::RegisterResponse {
            response: Ok(()),
            ..
        }
    ));
    assert_eq!(call_targets(&mut r, 1)[0].0, "w1");
    // The last member gone: the command is gone.
    r.close_channel("w1").unwrap();
    r.close_channel("w2").unwrap();
    r.take_actions();
    assert_eq!(r.route_of("calc.add"), None);
}

#[test]
fn a_forwarded_request_is_balanced_and_never_sent_back_to_its_sender() {
    let mut r = pool_root(2);
    // w1 calls the pool's own command: it goes to w2, never back to w1.
    for _ in 0..3 {
        r.handle_message("w1", exec_req("calc.add"), 0).unwrap();
        let (to, m) = only_send(&r.take_actions());
        assert_eq!(to, "w2");
        let Message::ExecuteRequest { id, .. } = m else {
            panic!("{m:?}")
        };
        answer(&mut r, "w2", &id);
    }
    // From outside, the members take turns.
    let mut to = Vec::new();
    for _ in 0..2 {
        r.handle_message("other", exec_req("calc.add"), 0).unwrap();
        let (t, m) = only_send(&r.take_actions());
        let Message::ExecuteRequest { id, .. } = m else {
            panic!("{m:?}")
        };
        answer(&mut r, &t, &id);
        to.push(t);
    }
    to.sort();
    assert_eq!(to, ["w1", "w2"]);
}

#[test]
fn timeouts_and_cancels_free_a_member_for_the_balance() {
    let mut r = pool_root(2);
    let c1 = r.execute("calc.add", None, Some(SEC), 0);
    r.take_actions();
    let _c2 = r.execute("calc.add", None, Some(10 * SEC), 0);
    r.take_actions();
    r.tick(2 * SEC); // w1's call timed out
    assert!(call_done(&r.take_actions(), c1).is_err());
    assert_eq!(call_targets(&mut r, 1)[0].0, "w1");
    let c4 = r.execute("calc.add", None, None, 0);
    let (to, _) = only_send(&r.take_actions());
    r.cancel_call(c4);
    let loads: Vec<u64> = r
        .stats()
        .channels
        .iter()
        .map(|(_, s)| s.in_flight)
        .collect();
    assert_eq!(loads.iter().sum::<u64>(), 2, "{to}: {loads:?}");
}

fn list_from(r: &mut Router, from: &str, ids: &[&str]) {
    r.handle_message(
        from,
        Message::ListResponse {
            id: new_id(),
            thid: "x".into(),
            commands: ids.iter().map(|i| CommandDef::new(*i)).collect(),
        },
        0,
    )
    .unwrap();
    r.take_actions();
}

/// Where `id` routes, if the router knows it (not the router-channel fallback).
fn owner(r: &Router, id: &str) -> Option<String> {
    r.list_commands()
        .iter()
        .any(|d| d.id == id)
        .then(|| r.route_of(id))
        .flatten()
}

#[test]
fn a_list_response_replaces_what_the_same_channel_listed_before() {
    let a = || Some("a".to_string());
    let mut r = with_channels("main", None, &["a", "b"]);
    register(&mut r, "a", "a.registered");
    list_from(&mut r, "a", &["a.one", "a.two", "a.registered"]);
    list_from(&mut r, "b", &["b.one"]);
    assert_eq!(owner(&r, "a.one"), a());
    // `a` lists again without `a.one`: that command left a's side.
    list_from(&mut r, "a", &["a.two", "a.three"]);
    assert_eq!(owner(&r, "a.one"), None);
    assert_eq!(owner(&r, "a.two"), a());
    assert_eq!(owner(&r, "a.three"), a());
    // What a registered lasts until a closes; what b listed is b's.
    assert_eq!(owner(&r, "a.registered"), a());
    assert_eq!(owner(&r, "b.one"), Some("b".to_string()));
    // An empty list forgets all it listed.
    list_from(&mut r, "a", &[]);
    assert_eq!(owner(&r, "a.two"), None);
    assert_eq!(owner(&r, "a.registered"), a());

    // The router channel's list replaces the router's routes the same way.
    let mut w = with_channels("w", Some("up"), &["up"]);
    list_from(&mut w, "up", &["up.one", "up.two"]);
    assert_eq!(owner(&w, "up.one"), Some("up".to_string()));
    list_from(&mut w, "up", &["up.two"]);
    assert_eq!(owner(&w, "up.one"), None);
    assert_eq!(owner(&w, "up.two"), Some("up".to_string()));
}

#[test]
fn a_request_for_a_detached_router_is_channel_disconnected_not_not_found() {
    // `mid` has a router channel configured but not attached (it is reconnecting): a child's
    // request for a command mid does not know may exist above it.
    let mut r = with_channels("mid", Some("up"), &["child"]);
    r.handle_message("child", exec_req("elsewhere.cmd"), 0)
        .unwrap();
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "child");
    assert!(
        matches!(
            m,
            Message::ExecuteResponse {
                response: Err(ExecError {
                    code: ErrorCode::ChannelDisconnected,
                    ..
                }),
                ..
            }
        ),
        "{m:?}"
    );
    // Without a router channel the same request is `not_found`.
    let mut root = with_channels("root", None, &["child"]);
    root.handle_message("child", exec_req("elsewhere.cmd"), 0)
        .unwrap();
    let (_, m) = only_send(&root.take_actions());
    assert!(
        matches!(
            m,
            Message::ExecuteResponse {
                response: Err(ExecError {
                    code: ErrorCode::NotFound,
                    ..
                }),
                ..
            }
        ),
        "{m:?}"
    );
}

fn error_code_of(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::ExecuteResponse {
            response: Err(e), ..
        } => Some(e.code),
        _ => None,
    }
}

#[test]
fn one_channel_cannot_take_every_slot_of_max_pending() {
    let mut c = Config::new("svc");
    c.max_pending = 10;
    c.max_pending_per_channel = 3;
    let mut r = Router::new(c, ids_for("svc"));
    for ch in ["a", "b", "w"] {
        r.add_channel(ch, Encoding::Json).unwrap();
    }
    r.take_actions();
    r.register_local(CommandDef::new("slow"), 1, 0);
    register(&mut r, "w", "remote");
    // a's handler runs never finish (its calls timed out on a's side, say).
    let mut jobs = Vec::new();
    for _ in 0..3 {
        r.handle_message("a", exec_req("slow"), 0).unwrap();
        let acts = r.take_actions();
        match &acts[..] {
            [Action::RunHandler { job, .. }] => jobs.push(*job),
            other => panic!("{other:#?}"),
        }
    }
    // The fourth, to a handler or forwarded, is refused at once.
    for cmd in ["slow", "remote"] {
        r.handle_message("a", exec_req(cmd), 0).unwrap();
        let (to, m) = only_send(&r.take_actions());
        assert_eq!(to, "a");
        assert_eq!(error_code_of(&m), Some(ErrorCode::InternalError), "{m:?}");
    }
    assert_eq!(r.serving("a"), 3);
    // b is still served.
    r.handle_message("b", exec_req("slow"), 0).unwrap();
    assert!(matches!(r.take_actions()[..], [Action::RunHandler { .. }]));
    // A run that ends frees a slot of a's.
    r.complete_job(jobs[0], Ok(None)).unwrap();
    r.take_actions();
    assert_eq!(r.serving("a"), 2);
    r.handle_message("a", exec_req("remote"), 0).unwrap();
    let (to, fwd) = only_send(&r.take_actions());
    assert_eq!(to, "w");
    assert_eq!(r.serving("a"), 3);
    // A forward that times out frees its slot too; so does one that is answered.
    r.tick(r.config().request_ttl + 1);
    r.take_actions();
    assert_eq!(r.serving("a"), 2);
    let _ = fwd;
    r.handle_message("a", exec_req("remote"), 0).unwrap();
    let (_, fwd) = only_send(&r.take_actions());
    r.handle_message(
        "w",
        Message::ExecuteResponse {
            id: new_id(),
            thid: fwd.id().to_string(),
            response: ok_payload("1"),
        },
        0,
    )
    .unwrap();
    r.take_actions();
    assert_eq!(r.serving("a"), 2);
    // The runs of a channel that closed still count until they end, then nothing is left.
    r.close_channel("a").unwrap();
    r.take_actions();
    assert_eq!(r.serving("a"), 2);
    for job in &jobs[1..] {
        r.complete_job(*job, Ok(None)).unwrap();
    }
    assert_eq!(r.serving("a"), 0);
}

#[test]
fn a_channel_registers_a_bounded_number_of_bounded_commands() {
    let mut c = Config::new("root");
    c.max_commands_per_channel = 3;
    c.max_command_size = 100;
    let mut r = Router::new(c, ids_for("root"));
    for ch in ["a", "b"] {
        r.add_channel(ch, Encoding::Json).unwrap();
    }
    r.take_actions();
    let refused = |acts: &[Action]| {
        let (_, m) = only_send(acts);
        let dropped = acts.iter().any(|a| {
            matches!(a, Action::Dropped { kind: DropKind::Rejected, reason, .. }
                if reason.contains("max_command"))
        });
        matches!(
            m,
            Message::RegisterResponse {
                response: Err(RegisterError::DuplicateCommand),
                ..
            }
        ) && dropped
    };
    for i in 0..3 {
        assert!(!refused(&register(&mut r, "a", &format!("a.{i}"))));
    }
    // Registering again an id it holds (a restarted worker) is not one more.
    assert!(!refused(&register(&mut r, "a", "a.0")));
    assert!(refused(&register(&mut r, "a", "a.3")));
    assert_eq!(owner(&r, "a.3"), None);
    // Another channel has its own count; a definition over the size bound is refused.
    assert!(!refused(&register(&mut r, "b", "b.0")));
    let mut big = CommandDef::new("b.big");
    big.description = Some("x".repeat(200));
    r.handle_message(
        "b",
        Message::RegisterRequest {
            id: new_id(),
            command: big,
        },
        0,
    )
    .unwrap();
    assert!(refused(&r.take_actions()));
    // A list is bounded the same way.
    let mut listed: Vec<CommandDef> = (0..5).map(|i| CommandDef::new(format!("l.{i}"))).collect();
    listed[0].description = Some("y".repeat(200));
    r.handle_message(
        "b",
        Message::ListResponse {
            id: new_id(),
            thid: "t".into(),
            commands: listed,
        },
        0,
    )
    .unwrap();
    let acts = r.take_actions();
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Dropped {
            kind: DropKind::Rejected,
            ..
        }
    )));
    let known: Vec<String> = r
        .list_commands()
        .into_iter()
        .map(|d| d.id)
        .filter(|i| i.starts_with("l."))
        .collect();
    assert_eq!(known, ["l.1", "l.2", "l.3"]);
    // A channel that closes and comes back starts from nothing.
    r.close_channel("a").unwrap();
    r.add_channel("a", Encoding::Json).unwrap();
    r.take_actions();
    assert!(!refused(&register(&mut r, "a", "a.3")));
}

// ---------------------------------------------------------------------------------------------
// Sends the driver could not carry out
// ---------------------------------------------------------------------------------------------

fn refused_codec() -> Refusal {
    Refusal::Codec(CodecError::TooLarge {
        size: 11,
        limit: 10,
    })
}

#[test]
fn a_refused_request_fails_its_caller_at_once() {
    let mut r = with_channels("main", Some("up"), &["up"]);
    for (why, code) in [
        (refused_codec(), ErrorCode::InvalidRequest),
        (Refusal::OutboxFull("full".into()), ErrorCode::InternalError),
    ] {
        let call = r.execute("x", None, None, 0);
        let (to, m) = only_send(&r.take_actions());
        r.send_refused(&to, m, why);
        let err = call_done(&r.take_actions(), call).unwrap_err();
        assert_eq!(err.code, code, "{err:?}");
        assert_eq!(r.stats().pending, 0);
    }
    let up = &r.stats().channels[0].1;
    assert_eq!((up.dropped, up.in_flight), (2, 0));
    // Neither is a message dropped unanswered.
    assert_eq!(r.stats().dropped, 0);
}

#[test]
fn a_refused_forward_is_answered_to_its_origin() {
    let mut r = with_channels("main", None, &["a", "b"]);
    register(&mut r, "b", "b.cmd");
    let m = exec_req("b.cmd");
    let origin_id = m.id().to_string();
    r.handle_message("a", m, 0).unwrap();
    let (to, fwd) = only_send(&r.take_actions());
    assert_eq!(to, "b");
    r.send_refused("b", fwd, Refusal::OutboxFull("b is full".into()));
    let (to, answer) = only_send(&r.take_actions());
    assert_eq!(to, "a");
    let Message::ExecuteResponse { thid, response, .. } = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(thid, origin_id);
    let err = response.unwrap_err();
    assert_eq!(err.code, ErrorCode::InternalError);
    assert!(err.message.contains("b is full"), "{err:?}");
    assert_eq!((r.stats().pending_forwards, r.serving("a")), (0, 0));
}

#[test]
fn a_result_over_the_limits_is_answered_internal_error_and_a_full_outbox_drops_it() {
    let mut r = with_channels("main", None, &["a"]);
    r.register_local(CommandDef::new("big"), 1, 0);
    r.take_actions();
    for full in [false, true] {
        r.handle_message("a", exec_req("big"), 0).unwrap();
        let job = match r.take_actions().as_slice() {
            [Action::RunHandler { job, .. }] => *job,
            other => panic!("{other:?}"),
        };
        r.complete_job(job, ok_payload("1")).unwrap();
        let (_, resp) = only_send(&r.take_actions());
        let dropped = r.stats().dropped;
        let why = if full {
            Refusal::OutboxFull("full".into())
        } else {
            refused_codec()
        };
        r.send_refused("a", resp.clone(), why);
        let acts = r.take_actions();
        if full {
            assert!(acts.is_empty(), "{acts:?}");
            assert_eq!(r.stats().dropped, dropped + 1);
        } else {
            let (_, answer) = only_send(&acts);
            let (
                Message::ExecuteResponse {
                    thid,
                    response: Err(e),
                    ..
                },
                Message::ExecuteResponse { thid: t0, .. },
            ) = (&answer, &resp)
            else {
                panic!("{answer:?}")
            };
            assert_eq!((thid, e.code), (t0, ErrorCode::InternalError));
            // The short error refused again is dropped, not replaced once more.
            r.send_refused("a", answer, refused_codec());
            let acts = r.take_actions();
            assert!(matches!(
                acts.as_slice(),
                [Action::Dropped {
                    kind: DropKind::OverLimit,
                    ..
                }]
            ));
        }
    }
}

#[test]
fn refused_events_are_counted_and_reported_unless_the_outbox_is_full() {
    let mut r = with_channels("main", None, &["a"]);
    r.emit_event("e", None, 0);
    let (_, ev) = only_send(&r.take_actions());
    r.send_refused("a", ev.clone(), Refusal::OutboxFull("full".into()));
    assert!(r.take_actions().is_empty());
    r.send_refused("a", ev, refused_codec());
    assert!(matches!(
        r.take_actions().as_slice(),
        [Action::Dropped {
            kind: DropKind::OverLimit,
            ..
        }]
    ));
    assert_eq!(r.stats().dropped, 2);
    assert_eq!(r.stats().channels[0].1.dropped, 2);
}

#[test]
fn a_local_request_may_nest_one_level_less_than_max_depth() {
    let mut c = Config::new("main");
    c.router_channel = Some("up".into());
    c.limits.max_depth = 8;
    let mut r = Router::new(c, ids_for("main"));
    r.add_channel("up", Encoding::Json).unwrap();
    r.take_actions();
    // `{"a":{"a":...{}}}`, n objects deep (a request is an object).
    let nest = |n: usize| {
        Payload::json(format!(
            "{}{{}}{}",
            r#"{"a":"#.repeat(n - 1),
            "}".repeat(n - 1)
        ))
    };
    let call = r.execute("x", Some(nest(8)), None, 0);
    let err = call_done(&r.take_actions(), call).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert!(err.message.contains("nesting"), "{err:?}");
    r.execute("x", Some(nest(7)), None, 0);
    only_send(&r.take_actions());
}

#[test]
fn listing_first_does_not_get_around_the_command_bound() {
    let mut c = Config::new("root");
    c.max_commands_per_channel = 3;
    let mut r = Router::new(c, ids_for("root"));
    r.add_channel("p", Encoding::Json).unwrap();
    r.take_actions();
    list_from(&mut r, "p", &["x.0", "x.1", "x.2", "x.3", "x.4"]);
    let mut refused = 0;
    for i in 0..5 {
        let acts = register(&mut r, "p", &format!("x.{i}"));
        let (_, m) = only_send(&acts);
        if matches!(
            m,
            Message::RegisterResponse {
                response: Err(RegisterError::DuplicateCommand),
                ..
            }
        ) {
            refused += 1;
        }
    }
    assert_eq!(refused, 2, "a command it only listed is not one it holds");
}

#[test]
fn the_same_registration_again_is_acknowledged_without_escalating() {
    let mut r = with_channels("mid", Some("up"), &["up", "child"]);
    let acts = register(&mut r, "child", "c.cmd");
    let (to, up_req) = only_send(&acts);
    assert_eq!(to, "up");
    r.handle_message(
        "up",
        Message::RegisterResponse {
            id: new_id(),
            thid: up_req.id().to_string(),
            response: Ok(()),
        },
        0,
    )
    .unwrap();
    r.take_actions();
    // A child re-registering what it holds, 100 times: nothing goes up, each is acked.
    for _ in 0..100 {
        let (to, m) = only_send(&register(&mut r, "child", "c.cmd"));
        assert_eq!(to, "child");
        assert!(matches!(
            m,
            Message::RegisterResponse {
                response: Ok(()),
                ..
            }
        ));
    }
}

#[test]
fn requests_in_flight_do_not_count_as_commands() {
    let mut c = Config::new("root");
    c.max_commands_per_channel = 1;
    let mut r = Router::new(c, ids_for("root"));
    r.add_channel("child", Encoding::Json).unwrap();
    r.take_actions();
    r.register_local(CommandDef::new("svc"), 1, 0);
    for _ in 0..5 {
        r.handle_message("child", exec_req("svc"), 0).unwrap();
    }
    r.take_actions();
    assert_eq!(r.serving("child"), 5);
    let (_, m) = only_send(&register(&mut r, "child", "c.first"));
    assert!(
        matches!(
            m,
            Message::RegisterResponse {
                response: Ok(()),
                ..
            }
        ),
        "{m:?}"
    );
}

#[test]
fn an_unreadable_response_fails_its_call_and_forward_at_once() {
    let mut r = with_channels("mid", None, &["w", "up"]);
    register(&mut r, "w", "cmd");
    let call = r.execute("cmd", None, None, 0);
    let (_, req) = only_send(&r.take_actions());
    // A result no peer can carry (an integer beyond 64 bits).
    let bad = format!(
        r#"{{"id":"x1","type":"execute.command.response","thid":"{}","response":{{"ok":true,"result":18446744073709551616}}}}"#,
        req.id()
    );
    assert!(r.handle_frame("w", bad.as_bytes(), 0).is_err());
    let err = call_done(&r.take_actions(), call).unwrap_err();
    assert_eq!(err.code, ErrorCode::InternalError);
    assert!(err.message.contains("could not be read"), "{err:?}");
    // A forwarded request: its origin is answered.
    r.handle_message("up", exec_req("cmd"), 0).unwrap();
    let (_, fwd) = only_send(&r.take_actions());
    let bad = format!(
        r#"{{"id":"x2","type":"execute.command.response","thid":"{}","response":{{"ok":true,"result":1e400}}}}"#,
        fwd.id()
    );
    assert!(r.handle_frame("w", bad.as_bytes(), 0).is_err());
    let (to, m) = only_send(&r.take_actions());
    assert_eq!(to, "up");
    assert_eq!(error_code_of(&m), Some(ErrorCode::InternalError));
    assert_eq!(r.stats().pending, 0);
    assert_eq!(r.stats().pending_forwards, 0);
}
