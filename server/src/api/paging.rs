//! How every List call pages (AIP-158), in one place: the page size against its bounds, an
//! opaque token that remembers where the last page ended and the filters it was made for, and a
//! page that stops at its size or at the byte budget ([`budget::fill`]).
//!
//! A token is the JSON of [`Token`] in URL-safe base64. Clients must treat it as opaque; the
//! server refuses one it could not have issued, or one reused with other filters, naming
//! `page_token`.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use prost::Message;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{ApiError, budget, validate};

/// Where an item lies in a listing's order, as a token carries it. A token comes from the
/// client, so its cursor is checked before the store sees it.
pub trait Cursor: Serialize + DeserializeOwned {
    fn is_valid(&self) -> bool;
}

/// A job's id: listings by id need no more than that it parses.
impl Cursor for uuid::Uuid {
    fn is_valid(&self) -> bool {
        true
    }
}

/// A row number (the audit log's): any number names a place in the order.
impl Cursor for i64 {
    fn is_valid(&self) -> bool {
        true
    }
}

/// A name (queues, job types, schedules): it must be one the API accepts as a name.
impl Cursor for String {
    fn is_valid(&self) -> bool {
        validate::name("page_token", self).is_ok()
    }
}

/// What a page token carries: the cursor of the last item given, and the request's filters.
#[derive(Serialize, Deserialize)]
struct Token<C, F> {
    after: C,
    filter: F,
}

/// A List request's paging, validated: the page size and where the page starts.
#[derive(Debug)]
pub struct PageRequest<C, F> {
    size: usize,
    /// The cursor of the last item of the previous page; `None` for the first page.
    pub after: Option<C>,
    filter: F,
}

impl<C, F> PageRequest<C, F>
where
    C: Cursor,
    F: Serialize + DeserializeOwned + PartialEq,
{
    /// Reads `page_size` (0 means `default`, at most `max`) and `page_token`, which must have
    /// been issued for the same `filter`.
    pub fn parse(
        page_size: i32,
        page_token: &str,
        filter: F,
        (default, max): (i32, i32),
    ) -> Result<Self, ApiError> {
        let size = match page_size {
            0 => default,
            n if (1..=max).contains(&n) => n,
            n => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("must be between 1 and {max}, got {n}"),
                ));
            }
        };
        let after = if page_token.is_empty() {
            None
        } else {
            let token: Token<C, F> = URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Token<C, F>>(&bytes).ok())
                .filter(|token| token.after.is_valid())
                .ok_or_else(|| {
                    ApiError::invalid("page_token", "is not a token this server issued")
                })?;
            if token.filter != filter {
                return Err(ApiError::invalid(
                    "page_token",
                    "was issued for other filters; filters must not change between pages",
                ));
            }
            Some(token.after)
        };
        Ok(Self {
            size: usize::try_from(size).unwrap_or(1),
            after,
            filter,
        })
    }

    /// How many items to ask the store for: one more than the page, so that the page knows
    /// whether more follow.
    pub fn limit(&self) -> i64 {
        i64::try_from(self.size).unwrap_or(i64::MAX) + 1
    }

    /// The page of `candidates` (in order, as the store read them; `truncated` when it had
    /// more than it read), and the token of the page after it: empty when this is the last.
    /// `cursor` names where an item lies in the listing's order.
    pub fn page<T: Message>(
        self,
        candidates: Vec<T>,
        truncated: bool,
        cursor: impl Fn(&T) -> Result<C, ApiError>,
    ) -> Result<(Vec<T>, String), ApiError> {
        let page = budget::fill(candidates, self.size, truncated);
        let next_page_token = match page.items.last() {
            Some(last) if page.more => {
                let token = Token {
                    after: cursor(last)?,
                    filter: self.filter,
                };
                let json = serde_json::to_vec(&token)
                    .map_err(|e| ApiError::Internal(format!("a page token: {e}")))?;
                URL_SAFE_NO_PAD.encode(json)
            }
            _ => String::new(),
        };
        Ok((page.items, next_page_token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Names = PageRequest<String, ()>;

    fn item(n: usize) -> prost_types::Any {
        prost_types::Any {
            type_url: format!("item-{n}"),
            value: Vec::new(),
        }
    }

    fn name_of(item: &prost_types::Any) -> Result<String, ApiError> {
        Ok(item.type_url.clone())
    }

    #[test]
    fn a_token_continues_after_the_last_item_given() {
        let first = Names::parse(2, "", (), (10, 100)).expect("first page");
        assert_eq!(first.limit(), 3);
        let (items, token) = first
            .page((0..3).map(item).collect(), false, name_of)
            .expect("page");
        assert_eq!(items.len(), 2);
        let next = Names::parse(2, &token, (), (10, 100)).expect("next page");
        assert_eq!(next.after.as_deref(), Some("item-1"));
        let (items, token) = next
            .page((2..3).map(item).collect(), false, name_of)
            .expect("page");
        assert_eq!((items.len(), token.as_str()), (1, ""), "the last page");
    }

    #[test]
    fn sizes_and_tokens_out_of_bounds_are_refused_naming_their_field() {
        let field = |r: Result<Names, ApiError>| match r {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(Names::parse(-1, "", (), (10, 100))), "page_size");
        assert_eq!(field(Names::parse(101, "", (), (10, 100))), "page_size");
        assert_eq!(
            field(Names::parse(0, "not base64!", (), (10, 100))),
            "page_token"
        );
        let other_filter = PageRequest::<String, String>::parse(1, "", "a".into(), (10, 100))
            .and_then(|r| r.page(vec![item(0), item(1)], false, name_of))
            .expect("page")
            .1;
        let reused = PageRequest::<String, String>::parse(1, &other_filter, "b".into(), (10, 100));
        assert!(
            matches!(reused, Err(ApiError::InvalidArgument { .. })),
            "{reused:?}"
        );
        assert_eq!(
            Names::parse(0, "", (), (10, 100)).expect("default").limit(),
            11
        );
        let nul = URL_SAFE_NO_PAD.encode(r#"{"after":"a\u0000b","filter":null}"#);
        assert_eq!(field(Names::parse(0, &nul, (), (10, 100))), "page_token");
    }
}
