//! The codec: MessagePack with named fields between services (so fields can be added without
//! breaking older readers), JSON where a person publishes by hand. Every decode error names
//! the field where it happened.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::spec::FieldError;

/// `Content-Type` of MessagePack payloads.
pub const MSGPACK: &str = "application/msgpack";
/// `Content-Type` of JSON payloads.
pub const JSON: &str = "application/json";

/// A payload's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    MsgPack,
}

impl Format {
    /// The encoding of a payload a person may have published: the `Content-Type` header when
    /// there is one, else MessagePack when the payload opens with a MessagePack map marker,
    /// else JSON.
    pub fn sniff(bytes: &[u8], content_type: Option<&str>) -> Format {
        match content_type.map(|c| c.to_ascii_lowercase()) {
            Some(c) if c.contains("json") => return Format::Json,
            Some(c) if c.contains("msgpack") => return Format::MsgPack,
            _ => {}
        }
        // Every lathe message is a map; a MessagePack map starts with 0x80–0x8f, 0xde or 0xdf.
        // Anything else is read as JSON, whose errors make sense to a person who typed it.
        match bytes.first() {
            Some(0x80..=0x8f) | Some(0xde) | Some(0xdf) => Format::MsgPack,
            _ => Format::Json,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::MsgPack => "MessagePack",
        }
    }
}

/// A payload that did not decode into the expected message.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("invalid {format} at `{path}`: {reason}")]
pub struct DecodeError {
    /// `JSON` or `MessagePack`.
    pub format: &'static str,
    /// Dotted path of the field where decoding failed (`.` for the whole payload).
    pub path: String,
    pub reason: String,
}

impl DecodeError {
    pub fn into_field_error(self) -> FieldError {
        FieldError::new(
            self.path,
            format!("invalid {}: {}", self.format, self.reason),
        )
    }
}

fn path_or_root(p: String) -> String {
    if p.is_empty() || p == "." {
        ".".into()
    } else {
        p
    }
}

/// Decodes a payload in the given format.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], format: Format) -> Result<T, DecodeError> {
    match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let v = serde_path_to_error::deserialize(&mut de).map_err(|e| DecodeError {
                format: "JSON",
                path: path_or_root(e.path().to_string()),
                reason: e.into_inner().to_string(),
            })?;
            de.end().map_err(|e| DecodeError {
                format: "JSON",
                path: ".".into(),
                reason: e.to_string(),
            })?;
            Ok(v)
        }
        Format::MsgPack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            serde_path_to_error::deserialize(&mut de).map_err(|e| DecodeError {
                format: "MessagePack",
                path: path_or_root(e.path().to_string()),
                reason: e.into_inner().to_string(),
            })
        }
    }
}

/// Decodes a payload a person may have published (JSON or MessagePack, see [`Format::sniff`]).
pub fn decode_any<T: DeserializeOwned>(
    bytes: &[u8],
    content_type: Option<&str>,
) -> Result<T, DecodeError> {
    decode(bytes, Format::sniff(bytes, content_type))
}

/// Decodes a service-to-service message (MessagePack).
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode(bytes, Format::MsgPack)
}

/// Encodes a message as MessagePack with named fields.
pub fn to_msgpack<T: Serialize>(value: &T) -> Vec<u8> {
    // Our message types only hold strings, numbers, maps and sequences, which MessagePack can
    // always encode into a Vec: an error here is a programming error, not bad input.
    rmp_serde::to_vec_named(value).expect("lathe messages always encode as MessagePack")
}

/// Encodes a message as JSON.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("lathe messages always encode as JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{InferInputs, InferRequest};

    #[test]
    fn sniffs_json_and_msgpack() {
        assert_eq!(Format::sniff(b"  {\"a\":1}", None), Format::Json);
        let mp = to_msgpack(&InferRequest {
            schema_version: 1,
            id: None,
            inputs: InferInputs::Row(vec![1.0]),
        });
        assert_eq!(Format::sniff(&mp, None), Format::MsgPack);
        assert_eq!(Format::sniff(&mp, Some("application/json")), Format::Json);
    }

    #[test]
    fn errors_name_the_field() {
        let err = decode::<InferRequest>(br#"{"inputs": [1, "x"]}"#, Format::Json).unwrap_err();
        assert_eq!(err.format, "JSON");
        assert!(err.to_string().contains("inputs"), "{err}");
        let err =
            decode::<InferRequest>(br#"{"inputs": [1], "colour": 2}"#, Format::Json).unwrap_err();
        assert!(err.reason.contains("colour"), "{err}");
    }

    #[test]
    fn msgpack_round_trip_keeps_names() {
        let req = InferRequest {
            schema_version: 1,
            id: Some("r1".into()),
            inputs: InferInputs::Batch(vec![vec![1.0, 2.0]]),
        };
        let bytes = to_msgpack(&req);
        let back: InferRequest = from_msgpack(&bytes).unwrap();
        assert_eq!(back, req);
        assert!(bytes.windows(6).any(|w| w == b"inputs"));
    }
}
