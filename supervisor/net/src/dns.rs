//! The DNS stub's wire format: questions in, answers out (`hickory-proto` reads and writes
//! the messages; agentd decides what they say).

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

/// How long clients may keep an answer. Short: agentd keeps what it resolved for the whole
/// call anyway, and a client asking again costs nothing.
const TTL: u32 = 30;

/// One question from the tool.
#[derive(Debug, Clone)]
pub struct Question {
    /// The message, kept to answer it.
    pub message: Message,
    /// The name asked, as the client spelled it (without the trailing dot).
    pub name: String,
    /// A, AAAA, or another type (answered with no records).
    pub qtype: RecordType,
}

/// Reads a datagram: a standard query with one question of class IN, else `None` (dropped).
pub fn question(bytes: &[u8]) -> Option<Question> {
    let message = Message::from_vec(bytes).ok()?;
    if message.message_type() != MessageType::Query || message.op_code() != OpCode::Query {
        return None;
    }
    let [q] = message.queries() else { return None };
    if q.query_class() != DNSClass::IN {
        return None;
    }
    let name = q.name().to_ascii().trim_end_matches('.').to_string();
    let qtype = q.query_type();
    Some(Question { message, name, qtype })
}

/// The answer to `q`: `rcode`, and those of `addrs` whose family the question asked for.
pub fn answer(q: &Question, rcode: ResponseCode, addrs: &[IpAddr]) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(q.message.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(q.message.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    for query in q.message.queries() {
        m.add_query(query.clone());
    }
    if let Some(owner) = q.message.queries().first().map(|x| x.name().clone()) {
        for ip in addrs {
            let data = match (ip, q.qtype) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            m.add_answer(Record::from_rdata(owner.clone(), TTL, data));
        }
    }
    // Encoding a message built from a parsed one cannot fail; an empty reply is dropped.
    m.to_vec().unwrap_or_default()
}
