//! `REPORT` (0x0070): a page of one provider's reconciliation report for one business day
//! (`docs/RECONCILIATION.md`), its summary or its item list, as the CSV lines
//! `settlegate report` writes.

use settlegate_types::limits::{business_day_valid, REPORT_ROWS_MAX};

use crate::frame::BODY_LEN_MAX;
use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// Which part of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportPart {
    /// The summary (1): a line per provider, merchant, business day, time zone and currency.
    Summary,
    /// The item list (2): a line per authorization and per operation.
    Items,
}

impl ReportPart {
    fn code(self) -> u8 {
        match self {
            ReportPart::Summary => 1,
            ReportPart::Items => 2,
        }
    }
}

/// A page of provider `provider_code`'s report of `business_day`: `part`'s rows from
/// `offset`, at most `rows_max` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetReport {
    /// The business day, `YYYY-MM-DD` (in each merchant's time zone, as the report counts).
    pub business_day: String,
    /// The provider (the identity's `providers` must list it, with the `report` permission).
    pub provider_code: u32,
    /// The summary or the items.
    pub part: ReportPart,
    /// The first row wanted (0: the first).
    pub offset: u32,
    /// Rows at most, 1 to [`REPORT_ROWS_MAX`].
    pub rows_max: u16,
}

/// A page of a report part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportPage {
    /// When the server built the report the page is taken from (ms since the epoch): the
    /// same on every page of one build. A page of another build means the report was made
    /// again in between: read it again from offset 0.
    pub generated_ms: i64,
    /// The part's rows in all, for that day and provider.
    pub total: u32,
    /// The part's CSV header line (no line end).
    pub header: String,
    /// The rows from the request's offset, as CSV lines (no line ends; a quoted field may hold
    /// a line break).
    pub lines: Vec<String>,
}

const _: () = assert!(REPORT_ROWS_MAX == 1_000, "the BAD_REQUEST detail of rows_max names 1000");

/// Bytes of a page's body before its lines: `i64`, `u32`, the header's `u16` length, the
/// `u16` count.
const PAGE_FIXED_LEN: usize = 8 + 4 + 2 + 2;

impl ReportPage {
    /// The page of `lines` (the part's rows from the request's offset on) a reply carries:
    /// the first `rows_max` of them, fewer when the next would take the body past a frame's
    /// ([`BODY_LEN_MAX`]). Empty when even the first would: a row longer than a frame, which
    /// the report's fields never make.
    pub fn fill(
        generated_ms: i64,
        total: u32,
        header: &str,
        lines: &[String],
        rows_max: u16,
    ) -> ReportPage {
        let mut used = PAGE_FIXED_LEN + header.len();
        let mut page = Vec::new();
        for line in lines.iter().take(usize::from(rows_max)) {
            used += 2 + line.len();
            if used > BODY_LEN_MAX {
                break;
            }
            page.push(line.clone());
        }
        ReportPage { generated_ms, total, header: header.to_owned(), lines: page }
    }
}

fn text16<'a>(r: &mut Reader<'a>, what: &'static str) -> Result<&'a str, BodyError> {
    std::str::from_utf8(r.bytes16(what)?).map_err(|_| BodyError::Invalid(what))
}

impl Codec for ReportPage {
    fn encode(&self, w: &mut Writer<'_>) {
        w.i64(self.generated_ms).u32(self.total).bytes16(self.header.as_bytes());
        let count = u16::try_from(self.lines.len()).expect("a page of at most 65,535 lines");
        w.u16(count);
        for line in &self.lines {
            w.bytes16(line.as_bytes());
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<ReportPage, BodyError> {
        let generated_ms = r.i64("generated_ms")?;
        let total = r.u32("total")?;
        let header = text16(r, "header")?.to_owned();
        let count = r.u16("count")?;
        let mut lines = Vec::with_capacity(usize::from(count).min(REPORT_ROWS_MAX.into()));
        for _ in 0..count {
            lines.push(text16(r, "line")?.to_owned());
        }
        Ok(ReportPage { generated_ms, total, header, lines })
    }
}

impl Operation for GetReport {
    const OPCODE: u16 = 0x0070;
    const NAME: &'static str = "report";
    type Reply = ReportPage;

    fn encode(&self, w: &mut Writer<'_>) {
        w.str8(&self.business_day)
            .u32(self.provider_code)
            .u8(self.part.code())
            .u32(self.offset)
            .u16(self.rows_max);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<GetReport, BodyError> {
        let business_day = r.str8("business_day")?;
        if !business_day_valid(business_day) {
            return Err(BodyError::Invalid("business_day: not a date (YYYY-MM-DD)"));
        }
        let provider_code = r.u32("provider_code")?;
        let part = match r.u8("part")? {
            1 => ReportPart::Summary,
            2 => ReportPart::Items,
            _ => return Err(BodyError::Invalid("part: 1 (summary) or 2 (items)")),
        };
        let offset = r.u32("offset")?;
        let rows_max = r.u16("rows_max")?;
        if !(1..=REPORT_ROWS_MAX).contains(&rows_max) {
            return Err(BodyError::Invalid("rows_max: 1 to 1000"));
        }
        Ok(GetReport { business_day: business_day.to_owned(), provider_code, part, offset, rows_max })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(day: &str, part: u8, rows_max: u16) -> Vec<u8> {
        let mut body = Vec::new();
        let mut w = Writer(&mut body);
        w.str8(day).u32(7).u8(part).u32(0).u16(rows_max);
        body
    }

    fn decode(body: &[u8]) -> Result<GetReport, BodyError> {
        let mut r = Reader::new(body);
        GetReport::decode(GetReport::OPCODE, &mut r)
    }

    #[test]
    fn bad_days_parts_and_page_sizes_do_not_parse() {
        assert!(decode(&request("2026-11-22", 2, 1_000)).is_ok());
        let bad_day = Err(BodyError::Invalid("business_day: not a date (YYYY-MM-DD)"));
        assert_eq!(decode(&request("2026-11-31", 1, 10)), bad_day);
        assert_eq!(decode(&request("20261122", 1, 10)), bad_day);
        let bad_rows = Err(BodyError::Invalid("rows_max: 1 to 1000"));
        assert_eq!(decode(&request("2026-11-22", 1, 0)), bad_rows);
        assert_eq!(decode(&request("2026-11-22", 1, 1_001)), bad_rows);
        assert_eq!(decode(&request("2026-11-22", 1, u16::MAX)), bad_rows);
        let bad_part = Err(BodyError::Invalid("part: 1 (summary) or 2 (items)"));
        assert_eq!(decode(&request("2026-11-22", 3, 10)), bad_part);
        assert_eq!(decode(&request("2026-11-22", 0, 10)), bad_part);
    }

    #[test]
    fn a_page_stops_before_a_frame_is_full() {
        let lines: Vec<String> = (0..REPORT_ROWS_MAX).map(|_| "x".repeat(300)).collect();
        let page = ReportPage::fill(1, 1_000, "h", &lines, REPORT_ROWS_MAX);
        assert_eq!(page.lines.len(), (BODY_LEN_MAX - PAGE_FIXED_LEN - 1) / 302);
        let mut body = Vec::new();
        page.encode(&mut Writer(&mut body));
        assert!(body.len() <= BODY_LEN_MAX);
        assert_eq!(ReportPage::fill(1, 1_000, "h", &lines[..3], 2).lines.len(), 2);
        assert_eq!(ReportPage::decode(&mut Reader::new(&body)), Ok(page));
    }
}
