//! Reading a JSON request body field by field, so a value of the wrong type is a 400 that names
//! its field (`param`), and fields this server does not know are ignored, as OpenAI ignores them.
//!
//! Also the value shapes OpenAI's endpoints share: a prompt or embedding input (a string, a list
//! of strings, token ids, or lists of token ids), `stop` (a string or a list), and a seed (any
//! 64-bit integer).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// A JSON object body.
pub struct Fields {
    map: Map<String, Value>,
}

/// One text or token-id input.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

impl Fields {
    /// Parses `body`, which must be one JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Self { map }),
            Ok(_) => Err(ApiError::invalid("the request body must be a JSON object", None)),
            Err(e) => Err(ApiError::invalid(format!("the request body is not valid JSON: {e}"), None)),
        }
    }

    /// The field `name` as a `T`; absent or `null` is `None`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v).map(Some).map_err(|e| ApiError::invalid(format!("{name}: {e}"), Some(name))),
        }
    }

    /// The raw value of `name`, when present and not `null`.
    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// `prompt` / `input`: a string, a list of strings, a list of token ids, or a list of lists
    /// of token ids; at most `max` inputs.
    pub fn inputs(&self, name: &str, max: usize) -> Result<Vec<Input>, ApiError> {
        let bad = |what: String| ApiError::invalid(format!("{name}: {what}"), Some(name));
        let shape = "expected a string, a list of strings, a list of token ids, or a list of lists of token ids";
        let inputs = match self.raw(name) {
            None => return Err(bad("is required".into())),
            Some(Value::String(s)) => vec![Input::Text(s.clone())],
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(bad("must not be an empty list".into()));
                }
                if items.len() > max && !items[0].is_number() {
                    return Err(bad(format!("{} inputs; the limit is {max}", items.len())));
                }
                match &items[0] {
                    Value::String(_) => items.iter().map(|v| v.as_str().map(|s| Input::Text(s.to_string()))).collect::<Option<Vec<_>>>(),
                    Value::Number(_) => ids(items).map(|ids| vec![Input::Ids(ids)]),
                    Value::Array(_) => items.iter().map(|v| v.as_array().and_then(|a| ids(a)).map(Input::Ids)).collect(),
                    _ => None,
                }
                .ok_or_else(|| bad(shape.into()))?
            }
            Some(_) => return Err(bad(shape.into())),
        };
        Ok(inputs)
    }

    /// `stop`: a string or a list of strings.
    pub fn stop(&self) -> Result<Vec<String>, ApiError> {
        match self.raw("stop") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(_) => Ok(self.get::<Vec<String>>("stop")?.unwrap_or_default()),
        }
    }

    /// `seed`: any integer that fits 64 bits; a negative one is taken as its two's complement,
    /// so every seed a client can send selects one stream.
    pub fn seed(&self) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.raw("seed") else { return Ok(None) };
        let n = v.as_number().ok_or_else(|| ApiError::invalid("seed: expected an integer", Some("seed")))?;
        n.as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("seed: expected a 64-bit integer, got {n}"), Some("seed")))
    }

    /// vLLM's `top_k`: -1 or 0 turn the cut off, a positive value keeps that many.
    pub fn top_k(&self) -> Result<Option<u32>, ApiError> {
        match self.get::<i64>("top_k")? {
            None => Ok(None),
            Some(-1 | 0) => Ok(Some(0)),
            Some(k) if k > 0 => Ok(Some(u32::try_from(k).unwrap_or(u32::MAX))),
            Some(k) => Err(ApiError::invalid(format!("top_k must be -1, 0 (off) or positive; got {k}"), Some("top_k"))),
        }
    }
}

/// Token ids from a JSON list, when every item is one.
fn ids(items: &[Value]) -> Option<Vec<u32>> {
    items.iter().map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> Fields {
        Fields::parse(json.as_bytes()).expect("object")
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let f = fields(r#"{"temperature": "hot", "n": 2, "unknown": [1, 2]}"#);
        let e = f.get::<f32>("temperature").expect_err("a string is not a number");
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("temperature")));
        assert!(e.message.starts_with("temperature: invalid type"), "{}", e.message);
        assert_eq!(f.get::<u32>("n").expect("n"), Some(2));
        assert_eq!(f.get::<u32>("absent").expect("absent"), None);
        let e = fields(r#"{"max_tokens": -1}"#).get::<u32>("max_tokens").expect_err("negative");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        for body in ["[1]", "not json", "", "\"text\""] {
            let e = Fields::parse(body.as_bytes()).err().expect("refused");
            assert_eq!(e.status.as_u16(), 400, "{body}");
        }
    }

    #[test]
    fn prompts_take_every_openai_shape() {
        let parse = |json: &str| fields(json).inputs("prompt", 4);
        assert_eq!(parse(r#"{"prompt": "hi"}"#).expect("string"), vec![Input::Text("hi".into())]);
        assert_eq!(parse(r#"{"prompt": ["a", "b"]}"#).expect("strings"), vec![Input::Text("a".into()), Input::Text("b".into())]);
        assert_eq!(parse(r#"{"prompt": [1, 2, 3]}"#).expect("ids"), vec![Input::Ids(vec![1, 2, 3])]);
        assert_eq!(parse(r#"{"prompt": [[1], [2, 3]]}"#).expect("id lists"), vec![Input::Ids(vec![1]), Input::Ids(vec![2, 3])]);
        for bad in [r#"{}"#, r#"{"prompt": []}"#, r#"{"prompt": 5}"#, r#"{"prompt": ["a", 1]}"#, r#"{"prompt": [1, -2]}"#] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        }
        let e = parse(r#"{"prompt": ["a", "b", "c", "d", "e"]}"#).expect_err("five prompts");
        assert!(e.message.contains("the limit is 4"), "{}", e.message);
        // A list of ids is one prompt, however long.
        assert_eq!(parse(r#"{"prompt": [1, 2, 3, 4, 5, 6]}"#).expect("ids").len(), 1);
    }

    #[test]
    fn stop_seed_and_top_k_shapes() {
        assert_eq!(fields(r#"{"stop": "\n"}"#).stop().expect("string"), vec!["\n".to_string()]);
        assert_eq!(fields(r#"{"stop": ["a", "b"]}"#).stop().expect("list"), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(fields(r#"{"stop": null}"#).stop().expect("null"), Vec::<String>::new());
        assert_eq!(fields(r#"{"stop": 3}"#).stop().expect_err("number").param.as_deref(), Some("stop"));
        assert_eq!(fields(r#"{"seed": 7}"#).seed().expect("seed"), Some(7));
        assert_eq!(fields(r#"{"seed": -1}"#).seed().expect("negative"), Some(u64::MAX));
        assert!(fields(r#"{"seed": 1.5}"#).seed().is_err());
        assert_eq!(fields(r#"{"top_k": -1}"#).top_k().expect("off"), Some(0));
        assert_eq!(fields(r#"{"top_k": 40}"#).top_k().expect("k"), Some(40));
        assert!(fields(r#"{"top_k": -5}"#).top_k().is_err());
    }
}
