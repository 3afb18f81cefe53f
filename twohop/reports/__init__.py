"""Reports: summary tables (markdown, CSV) and the figures of each part of the study."""
