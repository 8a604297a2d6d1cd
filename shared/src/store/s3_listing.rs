//! A ListObjectsV2 client of its own, for the one case `object_store` cannot list.
//!
//! `object_store` turns every listed key into a `Path`, which refuses empty segments
//! (`a//b`), `.` and `..` segments and ASCII control characters; one such key in a page
//! fails the whole listing. An input prefix is then listed here instead: the same signed
//! request (`encoding-type=url`, so that any key survives the XML), every key kept, and
//! the ones the client cannot read handed back as [`UnlistedObject`]s with the reason.

use std::sync::Arc;

use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{
    ClientOptions, CredentialProvider, HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{shown_name, Listing, ObjectInfo, StoreError, UnlistedObject};

type Credentials = Arc<dyn CredentialProvider<Credential = AwsCredential>>;

/// What is needed to sign and send a listing request to one bucket.
#[derive(Debug)]
pub(super) struct RawLister {
    client: HttpClient,
    credentials: Credentials,
    /// `https://host/bucket` (path style) or `https://bucket.host` (virtual hosted).
    bucket_url: String,
    region: String,
}

/// RFC 3986 unreserved characters stay; everything else is percent-encoded, as SigV4's
/// canonical query string wants it.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListBucketResult {
    #[serde(default)]
    contents: Vec<Contents>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
    encoding_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Contents {
    key: String,
    size: u64,
    last_modified: String,
}

impl RawLister {
    pub(super) fn new(
        credentials: Credentials,
        endpoint: Option<String>,
        bucket: &str,
        region: String,
        virtual_hosted: bool,
        allow_http: bool,
    ) -> Result<RawLister, object_store::Error> {
        let client = ReqwestConnector::default()
            .connect(&ClientOptions::new().with_allow_http(allow_http))?;
        let bucket_url = match endpoint {
            Some(endpoint) if virtual_hosted => endpoint.trim_end_matches('/').to_string(),
            Some(endpoint) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            None => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        };
        Ok(RawLister { client, credentials, bucket_url, region })
    }

    /// Every object under `root` + `prefix`, keys relative to `root`.
    pub(super) async fn scan(&self, root: &str, prefix: &str) -> Result<Listing, StoreError> {
        let full_prefix = match (root.is_empty(), prefix.is_empty()) {
            (true, _) => prefix.to_string(),
            (false, true) => format!("{root}/"),
            (false, false) => format!("{root}/{prefix}"),
        };
        let failed = |failure: Failure| match failure {
            Failure::Transient(detail) => {
                StoreError::Unavailable { key: prefix.to_string(), detail }
            }
            Failure::Refused(detail) => StoreError::Denied { key: prefix.to_string(), detail },
        };
        let mut listing = Listing::default();
        let mut token: Option<String> = None;
        loop {
            let page = self.page_retrying(&full_prefix, token.as_deref()).await.map_err(failed)?;
            let url_encoded = page.encoding_type.as_deref() == Some("url");
            for entry in page.contents {
                let raw =
                    if url_encoded { url_decoded(&entry.key) } else { entry.key.into_bytes() };
                let Some(relative) = raw.strip_prefix(root.as_bytes()) else { continue };
                let relative = if root.is_empty() {
                    relative
                } else {
                    relative.strip_prefix(b"/").unwrap_or(relative)
                };
                match usable_key(relative) {
                    Ok(key) => listing.objects.push(ObjectInfo {
                        key,
                        size: entry.size,
                        last_modified: OffsetDateTime::parse(
                            &entry.last_modified,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                    }),
                    Err(reason) => listing
                        .unlisted
                        .push(UnlistedObject { key_lossy: shown_key(relative), reason }),
                }
            }
            match page.next_continuation_token {
                Some(next) if page.is_truncated => token = Some(next),
                _ => break,
            }
        }
        listing.objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listing)
    }

    /// One page, tried up to four times over about 7 s when the store fails to answer
    /// (as `object_store` retries its own requests); a refusal (4xx) is not retried.
    async fn page_retrying(
        &self,
        prefix: &str,
        token: Option<&str>,
    ) -> Result<ListBucketResult, Failure> {
        let mut wait = std::time::Duration::from_secs(1);
        for _ in 0..3 {
            match self.page(prefix, token).await {
                Err(Failure::Transient(_)) => tokio::time::sleep(wait).await,
                other => return other,
            }
            wait *= 2;
        }
        self.page(prefix, token).await
    }

    async fn page(&self, prefix: &str, token: Option<&str>) -> Result<ListBucketResult, Failure> {
        let mut url = format!(
            "{}?encoding-type=url&list-type=2&prefix={}",
            self.bucket_url,
            utf8_percent_encode(prefix, QUERY)
        );
        if let Some(token) = token {
            url.push_str(&format!("&continuation-token={}", utf8_percent_encode(token, QUERY)));
        }
        let mut request = http::Request::builder()
            .method(http::Method::GET)
            .uri(&url)
            .body(HttpRequestBody::empty())
            .map_err(|error| Failure::Refused(error.to_string()))?;
        let credential = self
            .credentials
            .get_credential()
            .await
            .map_err(|error| Failure::Transient(error.to_string()))?;
        AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut request, None)
            .map_err(|error| Failure::Refused(error.to_string()))?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|error| Failure::Transient(error.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|error| Failure::Transient(error.to_string()))?;
        if !status.is_success() {
            let message = format!("listing answered {status}: {}", String::from_utf8_lossy(&body));
            return Err(if status.is_server_error() {
                Failure::Transient(message)
            } else {
                Failure::Refused(message)
            });
        }
        quick_xml::de::from_reader(body.as_ref())
            .map_err(|error| Failure::Refused(format!("unreadable listing: {error}")))
    }
}

/// Why a listing request failed: worth another try or not.
enum Failure {
    Transient(String),
    Refused(String),
}

/// A key as S3 returns it with `encoding-type=url` (form encoding: `+` is a space).
fn url_decoded(encoded: &str) -> Vec<u8> {
    let spaced = encoded.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced).collect()
}

/// The key as a string this store can read, or why it cannot be one.
fn usable_key(raw: &[u8]) -> Result<String, String> {
    let key = std::str::from_utf8(raw).map_err(|_| "the key is not valid UTF-8".to_string())?;
    match ObjectPath::parse(key) {
        Ok(_) => Ok(key.to_string()),
        Err(_) => Err(unreadable_key_reason(key)),
    }
}

fn unreadable_key_reason(key: &str) -> String {
    let what = if let Some(control) = key.chars().find(char::is_ascii_control) {
        format!("holds the control character {:?}", control)
    } else if key.split('/').any(str::is_empty) {
        "has an empty folder name (\"//\", or a leading or trailing \"/\")".to_string()
    } else if key.split('/').any(|segment| segment == "." || segment == "..") {
        "has a \".\" or \"..\" folder".to_string()
    } else {
        "is not a valid object path".to_string()
    };
    format!("the key {what}, which the store client cannot read; rename the object")
}

/// A key as `ls -b` would show it: invalid UTF-8 and control characters as `\xNN`.
fn shown_key(raw: &[u8]) -> String {
    shown_name(raw)
        .chars()
        .map(|c| if c.is_ascii_control() { format!("\\x{:02x}", c as u32) } else { c.to_string() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_the_client_cannot_read_are_named_with_their_reason() {
        assert_eq!(usable_key("平扫/IM #1.dcm".as_bytes()).unwrap(), "平扫/IM #1.dcm");
        let control = usable_key(b"a/ctl\x01.dcm").unwrap_err();
        assert!(control.contains("control character '\\u{1}'"), "{control}");
        assert!(usable_key(b"a//b.dcm").unwrap_err().contains("empty folder name"));
        assert!(usable_key(b"a/./b.dcm").unwrap_err().contains("\".\" or \"..\""));
        assert!(usable_key(b"a/\xff.dcm").unwrap_err().contains("not valid UTF-8"));
        assert_eq!(shown_key(b"a/ctl\x01\xff.dcm"), "a/ctl\\x01\\xff.dcm");
        assert_eq!(url_decoded("in/sp+ace%2B%01.dcm"), b"in/sp ace+\x01.dcm");
    }

    #[test]
    fn a_listing_page_parses_in_both_encodings() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>raw</Name><Prefix>in/</Prefix>
<IsTruncated>true</IsTruncated><NextContinuationToken>abc=</NextContinuationToken>
<Contents><Key>in/ctl%01x.dcm</Key><ETag>&#34;9d&#34;</ETag><Size>1</Size><LastModified>2026-11-27T19:28:19Z</LastModified></Contents>
<Contents><Key>in/a&amp;b.dcm</Key><Size>7</Size><LastModified>2026-11-27T19:28:19.000Z</LastModified></Contents>
<EncodingType>url</EncodingType><KeyCount>2</KeyCount></ListBucketResult>"#;
        let page: ListBucketResult = quick_xml::de::from_str(xml).unwrap();
        assert!(page.is_truncated);
        assert_eq!(page.next_continuation_token.as_deref(), Some("abc="));
        assert_eq!(page.encoding_type.as_deref(), Some("url"));
        assert_eq!(page.contents.len(), 2);
        assert_eq!(page.contents[1].key, "in/a&b.dcm");
        assert_eq!(page.contents[1].size, 7);
    }
}
