//! Draws the lines of [`super::model::screen`] with ratatui: styles only, no decisions.
use ratatui::{
    Frame,
    style::{Modifier, Style as Look},
    text::{Line as TextLine, Span},
    widgets::Paragraph,
};

use super::model::{Line, Style};

fn look(style: Style) -> Look {
    match style {
        Style::Title => Look::new().add_modifier(Modifier::BOLD),
        Style::Plain | Style::Frame => Look::new(),
        Style::Notice => Look::new().add_modifier(Modifier::BOLD | Modifier::REVERSED),
        Style::TableHeader => Look::new().add_modifier(Modifier::UNDERLINED),
        Style::Selected => Look::new().add_modifier(Modifier::REVERSED),
        Style::Telling => Look::new().add_modifier(Modifier::BOLD),
        Style::Keys => Look::new().add_modifier(Modifier::DIM),
    }
}

fn text_line(line: &Line) -> TextLine<'_> {
    let base = look(line.style);
    match line.emphasis.clone().filter(|r| line.text.is_char_boundary(r.start) && line.text.is_char_boundary(r.end)) {
        Some(r) => TextLine::from(vec![
            Span::styled(&line.text[..r.start], base),
            Span::styled(&line.text[r.clone()], base.add_modifier(Modifier::BOLD | Modifier::REVERSED)),
            Span::styled(&line.text[r.end..], base),
        ]),
        None => TextLine::styled(line.text.as_str(), base),
    }
}

pub fn draw(frame: &mut Frame, lines: &[Line]) {
    let text: Vec<TextLine> = lines.iter().map(text_line).collect();
    frame.render_widget(Paragraph::new(text), frame.area());
}
