//! Property tests: arbitrary spec-v1 messages round-trip through both codecs, and a message
//! moved JSON -> msgpack -> JSON keeps every value.

use cmd_ipc_core::codec::{self, Limits};
use cmd_ipc_core::message::{
    CommandDef, CommandSchema, Encoding, ErrorCode, ExecError, Message, Payload,
};
use proptest::prelude::*;
use serde_json::Value;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[^\u{0}]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn payload(v: Value) -> Payload {
    Payload::json(serde_json::to_string(&v).unwrap())
}

fn id() -> impl Strategy<Value = String> {
    "[^\u{0}]{1,40}"
}

fn command() -> impl Strategy<Value = CommandDef> {
    (
        "[a-z_.]{1,20}",
        proptest::option::of("[^\u{0}]{0,20}"),
        proptest::option::of((
            proptest::option::of(object()),
            proptest::option::of(json_value()),
        )),
    )
        .prop_map(|(id, description, schema)| CommandDef {
            id,
            description,
            schema: schema.map(|(req, resp)| CommandSchema {
                request: req.map(payload),
                response: resp.map(payload),
            }),
        })
}

fn message() -> impl Strategy<Value = Message> {
    let code = prop_oneof![
        Just(ErrorCode::NotFound),
        Just(ErrorCode::InvalidRequest),
        Just(ErrorCode::InternalError),
        Just(ErrorCode::Timeout),
        Just(ErrorCode::ChannelDisconnected),
    ];
    prop_oneof![
        (id(), command()).prop_map(|(id, command)| Message::RegisterRequest { id, command }),
        (id(), id(), any::<bool>()).prop_map(|(id, thid, ok)| Message::RegisterResponse {
            id,
            thid,
            response: if ok {
                Ok(())
            } else {
                Err(cmd_ipc_core::message::RegisterError::DuplicateCommand)
            },
        }),
        id().prop_map(|id| Message::ListRequest { id }),
        (id(), id(), prop::collection::vec(command(), 0..4))
            .prop_map(|(id, thid, commands)| Message::ListResponse { id, thid, commands }),
        (id(), "[a-z.]{1,20}", proptest::option::of(object())).prop_map(|(id, c, r)| {
            Message::ExecuteRequest {
                id,
                command_id: c,
                request: r.map(payload),
            }
        }),
        (id(), id(), proptest::option::of(json_value())).prop_map(|(id, thid, r)| {
            Message::ExecuteResponse {
                id,
                thid,
                response: Ok(r.map(payload)),
            }
        }),
        (id(), id(), code, "[^\u{0}]{0,30}").prop_map(|(id, thid, code, m)| {
            Message::ExecuteResponse {
                id,
                thid,
                response: Err(ExecError::new(code, m)),
            }
        }),
        (id(), "[a-z._]{1,20}", proptest::option::of(json_value())).prop_map(|(id, e, p)| {
            Message::Event {
                id,
                event_id: e,
                payload: p.map(payload),
            }
        }),
    ]
}

fn as_value(m: &Message) -> Value {
    serde_json::from_slice(&codec::encode_json(m).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn json_round_trip(m in message()) {
        let lim = Limits::default();
        let bytes = codec::encode_json(&m).unwrap();
        prop_assert_eq!(codec::decode_json(&bytes, &lim).unwrap(), m);
    }

    #[test]
    fn msgpack_round_trip_keeps_every_value(m in message()) {
        let lim = Limits::default();
        let mp = codec::encode(&m, Encoding::Msgpack).unwrap();
        let back = codec::decode_msgpack(&mp, &lim).unwrap();
        prop_assert_eq!(codec::encode_msgpack(&back).unwrap(), mp);
        prop_assert_eq!(as_value(&back), as_value(&m));
    }
}
