//! JSON bodies, two views: what the strict parser accepts, serde_json accepts too, with the
//! same value, and the exact number text the constraints read (a walk over the original
//! bytes) is the number the value holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scopegate::policy::parse_json_body;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = parse_json_body(data, Some("application/json")) else {
        return;
    };
    assert_eq!(body.raw(), data);
    let value: Value =
        serde_json::from_slice(data).expect("accepted by the strict parser, refused by serde");
    assert_eq!(&value, body.value());
    if let Value::Object(map) = body.value() {
        for (key, v) in map {
            let text = body.number_text(&[key.as_str()]);
            match v {
                Value::Number(n) => {
                    let text = text.unwrap_or_else(|| panic!("no number text at {key:?}"));
                    let parsed: Value = serde_json::from_str(text).expect("number text");
                    assert_eq!(parsed.as_f64(), n.as_f64(), "{key:?}: {text}");
                }
                _ => assert_eq!(text, None, "number text for a non-number at {key:?}"),
            }
        }
    }
});
