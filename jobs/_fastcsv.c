/* An SQLite export's pages as CSV, straight from SQLite's C API (used by jobs.sqlite_pages).

   Only for values already in their canonical form: integers, 0 and 1 as booleans, text that is
   valid UTF-8 without NUL, ISO dates and date-times with a valid calendar, floats and integers
   of a decimal with a scale of 0 to 6 that round without doubt. It writes the very bytes the
   Arrow reader (jobs.sqlite_reader) writes for them; a page holding any other value is refused
   whole (`page` returns False) and the caller reads it the Arrow way, which knows the rest.

   `copy_out` reads a PostgreSQL COPY's rows into one buffer, for jobs.postgres_pages: through the
   libpq psycopg loaded, the one libpq in the process, found by its name (none or two: not used).

   It links the same SQLite library as Python's sqlite3 module (one copy per process: POSIX
   locks stay sound, unlike with a second copy), opens the file read-only, and lets go of the
   GIL while it reads and formats a page. */

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <sqlite3.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

enum kind { K_INT, K_TEXT, K_DATE, K_DATETIME, K_BOOL, K_DECIMAL };

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    /* A page: from the start or after the key bound to ?1, to its size or up to the key
       bound to ?2 (index: 2 * has ?1 + has ?2). */
    sqlite3_stmt *pages[4];
    int columns;         /* exported columns, after the key (result column 0) */
    int *kinds;
    int *scales;         /* -1: none */
    double limit;        /* seconds a page may take */
    double deadline;
    Buf page;            /* kept from page to page: no new memory to fault in for each */
} Reader;

static int grow(Buf *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1 << 20;
    while (cap < b->len + more) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

#define PUT(b, c) ((b)->data[(b)->len++] = (c))

static void put_digits(Buf *b, uint64_t v) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) PUT(b, tmp[--n]);
}

static void put_int(Buf *b, int64_t v) {
    if (v < 0) {
        PUT(b, '-');
        put_digits(b, (uint64_t)0 - (uint64_t)v);
    } else {
        put_digits(b, (uint64_t)v);
    }
}

/* What a text byte asks for: 0 nothing, 1 quoting (" , CR LF), 2 refusal (NUL), 3 a UTF-8
   sequence to check. */
static unsigned char byte_class[256];
static unsigned char formula_prefix[256]; /* jobs.csvrows.FORMULA_PREFIXES */

static void init_classes(void) {
    byte_class['"'] = byte_class[','] = byte_class['\r'] = byte_class['\n'] = 1;
    byte_class[0] = 2;
    for (int c = 0x80; c < 256; c++) byte_class[c] = 3;
    for (const char *c = "=+-@\t\r"; *c; c++) formula_prefix[(unsigned char)*c] = 1;
}

/* The length of the valid UTF-8 sequence at s (n bytes left), 0 if it is not one (RFC 3629:
   no overlong forms, no surrogates, nothing past U+10FFFF). */
static int utf8_length(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c >= 0xC2 && c <= 0xDF) return n >= 2 && (s[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0;
        if (c == 0xED && s[1] > 0x9F) return 0;
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0;
        if (c == 0xF4 && s[1] > 0x8F) return 0;
        return 4;
    }
    return 0;
}

/* Bytes of a 64-bit word, for the SWAR tests below. */
static const uint64_t ONES = 0x0101010101010101ULL, HIGHS = 0x8080808080808080ULL;

/* Whether any of the 8 bytes of v is b (a SWAR test: true only for a byte equal to b). */
static inline uint64_t has_byte(uint64_t v, unsigned char b) {
    uint64_t x = v ^ (ONES * b);
    return (x - ONES) & ~x & HIGHS;
}

/* Whether 8 bytes are plain: ASCII with nothing to quote and no NUL. */
static inline int plain_word(const unsigned char *s) {
    uint64_t v;
    memcpy(&v, s, 8);
    return !((v & HIGHS) | has_byte(v, '"') | has_byte(v, ',') | has_byte(v, '\r') |
             has_byte(v, '\n') | has_byte(v, 0));
}

/* Text neutralised (with `neutralise`, a formula prefix gets an apostrophe) and quoted where
   CSV needs it, as jobs.sqlite_reader._text; -1 for text it refuses. */
static int put_text(Buf *b, const unsigned char *s, size_t n, int neutralise) {
    int quote = 0;
    for (size_t i = 0; i < n;) {
        if (i + 8 <= n && plain_word(s + i)) {
            i += 8;
            continue;
        }
        switch (byte_class[s[i]]) {
        case 0: i++; break;
        case 1: quote = 1; i++; break;
        case 2: return -1;
        default: {
            int len = utf8_length(s + i, n - i);
            if (!len) return -1;
            i += len;
        }
        }
    }
    if (grow(b, 2 * n + 3)) return -2;
    if (quote) PUT(b, '"');
    if (neutralise && n && formula_prefix[s[0]]) PUT(b, '\'');
    if (quote) {
        for (size_t i = 0; i < n; i++) {
            if (s[i] == '"') PUT(b, '"');
            PUT(b, (char)s[i]);
        }
        PUT(b, '"');
    } else {
        memcpy(b->data + b->len, s, n);
        b->len += n;
    }
    return 0;
}

static int digits(const unsigned char *s, int n) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Whether s starts with a valid YYYY-MM-DD from year 1. */
static int valid_date(const unsigned char *s) {
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int year = digits(s, 4), month = digits(s + 5, 2), day = digits(s + 8, 2);
    if (year < 1 || s[4] != '-' || s[7] != '-' || month < 1 || month > 12 || day < 1) return 0;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    return day <= days[month - 1] + (month == 2 && leap);
}

/* A date-time as YYYY-MM-DD[ T]HH:MM:SS[.f{1,6}], written cut to the second with a space. */
static int put_datetime(Buf *b, const unsigned char *s, size_t n) {
    if (n < 19 || !valid_date(s) || (s[10] != ' ' && s[10] != 'T') || s[13] != ':' ||
        s[16] != ':')
        return -1;
    int hour = digits(s + 11, 2), minute = digits(s + 14, 2), second = digits(s + 17, 2);
    if (hour < 0 || hour > 23 || minute < 0 || minute > 59 || second < 0 || second > 59)
        return -1;
    if (n > 19 && (s[19] != '.' || n < 21 || n > 26 || digits(s + 20, (int)n - 20) < 0))
        return -1;
    if (grow(b, 19)) return -2;
    memcpy(b->data + b->len, s, 10);
    b->data[b->len + 10] = ' ';
    memcpy(b->data + b->len + 11, s + 11, 8);
    b->len += 19;
    return 0;
}

static const double POWERS[] = {1, 10, 100, 1e3, 1e4, 1e5, 1e6};
static const uint64_t UNITS[] = {1, 10, 100, 1000, 10000, 100000, 1000000};

/* A decimal's float as jobs.sqlite_reader._float writes it with a scale: only where it rounds
   without doubt (under 10^14 units of its last place, and not near a tie: there, Python rounds
   it as PostgreSQL does). */
static int put_float(Buf *b, double x, int scale) {
    double units = fabs(x * POWERS[scale]);
    if (!(units < 1e14)) return -1; /* also NaN */
    double from_tie = fabs((units - floor(units)) - 0.5);
    if (!(from_tie > units * 1e-14)) return -1;
    uint64_t rounded = (uint64_t)floor(units + 0.5);
    if (grow(b, 32)) return -2;
    if (x < 0 && rounded) PUT(b, '-');
    put_digits(b, rounded / UNITS[scale]);
    if (scale) {
        PUT(b, '.');
        uint64_t fraction = rounded % UNITS[scale];
        for (int i = scale - 1; i >= 0; i--) {
            b->data[b->len + i] = (char)('0' + fraction % 10);
            fraction /= 10;
        }
        b->len += scale;
    }
    return 0;
}

/* A row's fields; -1 when a value is not one this writes, -2 when memory runs out. */
static int put_row(Reader *r, sqlite3_stmt *st, Buf *b) {
    for (int i = 0; i < r->columns; i++) {
        int col = i + 1, type = sqlite3_column_type(st, col);
        if (grow(b, 32)) return -2;
        if (i) PUT(b, ',');
        if (type == SQLITE_NULL) continue;
        int kind = r->kinds[i], done = 0;
        switch (kind) {
        case K_INT:
            if (type != SQLITE_INTEGER) return -1;
            put_int(b, sqlite3_column_int64(st, col));
            break;
        case K_BOOL: {
            if (type != SQLITE_INTEGER) return -1;
            sqlite3_int64 v = sqlite3_column_int64(st, col);
            if (v != 0 && v != 1) return -1;
            memcpy(b->data + b->len, v ? "true" : "false", v ? 4 : 5);
            b->len += v ? 4 : 5;
            break;
        }
        case K_DECIMAL: {
            int scale = r->scales[i];
            if (scale < 0 || scale > 6) return -1;
            if (type == SQLITE_FLOAT) {
                done = put_float(b, sqlite3_column_double(st, col), scale);
            } else if (type == SQLITE_INTEGER) {
                sqlite3_int64 v = sqlite3_column_int64(st, col);
                if (!(fabs((double)v) * POWERS[scale] < 1e14)) return -1;
                put_int(b, v);
                if (scale) {
                    PUT(b, '.');
                    memset(b->data + b->len, '0', scale);
                    b->len += scale;
                }
            } else {
                return -1;
            }
            break;
        }
        default: {
            if (type != SQLITE_TEXT) return -1;
            const unsigned char *s = sqlite3_column_text(st, col);
            size_t n = (size_t)sqlite3_column_bytes(st, col);
            if (!s) return -2;
            if (kind == K_TEXT) {
                done = put_text(b, s, n, 1);
            } else if (kind == K_DATETIME) {
                done = put_datetime(b, s, n);
            } else {
                if (n != 10 || !valid_date(s)) return -1;
                if (grow(b, 10)) return -2;
                memcpy(b->data + b->len, s, 10);
                b->len += 10;
            }
        }
        }
        if (done) return done;
    }
    if (grow(b, 1)) return -2;
    PUT(b, '\n');
    return 0;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int past_deadline(void *reader) {
    return now() > ((Reader *)reader)->deadline;
}

static PyObject *NotFast; /* a singleton False, returned for a page this does not write */

static int bind_key(sqlite3_stmt *st, int index, PyObject *key) {
    long long value = PyLong_AsLongLong(key);
    if (value == -1 && PyErr_Occurred()) return -1;
    sqlite3_bind_int64(st, index, value);
    return 0;
}

/* page(after, until) -> (csv bytes, rows, last key) | None without rows | False */
static PyObject *Reader_page(Reader *r, PyObject *args) {
    PyObject *after, *until;
    if (!PyArg_ParseTuple(args, "OO", &after, &until)) return NULL;
    if (!r->db) {
        PyErr_SetString(PyExc_ValueError, "the reader is closed");
        return NULL;
    }
    sqlite3_stmt *st = r->pages[2 * (after != Py_None) + (until != Py_None)];
    if ((after != Py_None && bind_key(st, 1, after)) ||
        (until != Py_None && bind_key(st, 2, until)))
        return NULL;
    Buf *b = &r->page;
    b->len = 0;
    int rows = 0, status = 0, rc;
    sqlite3_int64 last = 0;
    Py_BEGIN_ALLOW_THREADS
    r->deadline = now() + r->limit;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (sqlite3_column_type(st, 0) != SQLITE_INTEGER) {
            status = -1;
            break;
        }
        if ((status = put_row(r, st, b))) break;
        last = sqlite3_column_int64(st, 0);
        rows++;
    }
    sqlite3_reset(st);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (status == -2) {
        PyErr_NoMemory();
    } else if (status == -1) {
        result = Py_NewRef(NotFast);
    } else if (rc == SQLITE_INTERRUPT) {
        PyErr_Format(PyExc_TimeoutError, "a page took longer than %g s", r->limit);
    } else if (rc != SQLITE_DONE) {
        PyErr_SetString(PyExc_RuntimeError, sqlite3_errmsg(r->db));
    } else if (!rows) {
        result = Py_NewRef(Py_None);
    } else {
        result = Py_BuildValue("(y#iL)", b->data, (Py_ssize_t)b->len, rows, (long long)last);
    }
    return result;
}

static void close_reader(Reader *r) {
    for (int i = 0; i < 4; i++) {
        sqlite3_finalize(r->pages[i]);
        r->pages[i] = NULL;
    }
    sqlite3_close(r->db);
    r->db = NULL;
    free(r->page.data);
    r->page = (Buf){0};
}

static PyObject *Reader_close(Reader *r, PyObject *Py_UNUSED(ignored)) {
    close_reader(r);
    Py_RETURN_NONE;
}

static const char *KINDS[] = {"int", "text", "date", "datetime", "bool", "decimal"};

/* Reader(uri, sql, kinds, scales, limit): sql, the four pages' statements */
static int Reader_init(Reader *r, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    const char *uri, *sql[4];
    PyObject *kinds, *scales;
    double limit;
    if (!PyArg_ParseTuple(args, "s(ssss)O!O!d", &uri, &sql[0], &sql[1], &sql[2], &sql[3],
                          &PyTuple_Type, &kinds, &PyTuple_Type, &scales, &limit))
        return -1;
    int n = (int)PyTuple_GET_SIZE(kinds);
    if (PyTuple_GET_SIZE(scales) != n) {
        PyErr_SetString(PyExc_ValueError, "one scale per kind");
        return -1;
    }
    close_reader(r);
    PyMem_Free(r->kinds);
    PyMem_Free(r->scales);
    r->kinds = PyMem_New(int, n ? n : 1);
    r->scales = PyMem_New(int, n ? n : 1);
    if (!r->kinds || !r->scales) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const char *kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kinds, i));
        if (!kind) return -1;
        r->kinds[i] = -1;
        for (int k = 0; k < (int)(sizeof KINDS / sizeof *KINDS); k++)
            if (!strcmp(kind, KINDS[k])) r->kinds[i] = k;
        if (r->kinds[i] < 0) {
            PyErr_Format(PyExc_ValueError, "no kind %s", kind);
            return -1;
        }
        PyObject *scale = PyTuple_GET_ITEM(scales, i);
        r->scales[i] = scale == Py_None ? -1 : (int)PyLong_AsLong(scale);
        if (PyErr_Occurred()) return -1;
    }
    r->columns = n;
    r->limit = limit;
    int flags = SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX;
    int failed = sqlite3_open_v2(uri, &r->db, flags, NULL) != SQLITE_OK;
    for (int i = 0; i < 4 && !failed; i++)
        failed = sqlite3_prepare_v2(r->db, sql[i], -1, &r->pages[i], NULL) != SQLITE_OK;
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, r->db ? sqlite3_errmsg(r->db) : "out of memory");
        close_reader(r);
        return -1;
    }
    for (int i = 0; i < 4; i++) {
        if (sqlite3_column_count(r->pages[i]) != n + 1) {
            PyErr_SetString(PyExc_ValueError,
                            "each page selects the key and then one column per kind");
            close_reader(r);
            return -1;
        }
    }
    sqlite3_progress_handler(r->db, 4000, past_deadline, r);
    return 0;
}

static void Reader_dealloc(Reader *r) {
    close_reader(r);
    PyMem_Free(r->kinds);
    PyMem_Free(r->scales);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* libpq's functions, from the libpq psycopg loaded. */
static int (*pq_get_copy_data)(void *conn, char **buffer, int async);
static void (*pq_freemem)(void *ptr);
static int libpq_copies;

static int find_libpq(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size, (void)data;
    if (!info->dlpi_name || !strstr(info->dlpi_name, "libpq")) return 0;
    void *handle = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
    if (!handle) return 0;
    void *get = dlsym(handle, "PQgetCopyData"), *freemem = dlsym(handle, "PQfreemem");
    if (get && freemem && get != (void *)pq_get_copy_data) {
        libpq_copies++;
        pq_get_copy_data = (int (*)(void *, char **, int))get;
        pq_freemem = (void (*)(void *))freemem;
    }
    dlclose(handle); /* psycopg's own reference keeps it loaded */
    return 0;
}

/* libpq() -> whether copy_out can run: one libpq is loaded (import psycopg first). */
static PyObject *libpq(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    if (libpq_copies != 1) {
        libpq_copies = 0;
        pq_get_copy_data = NULL;
        dl_iterate_phdr(find_libpq, NULL);
    }
    return PyBool_FromLong(libpq_copies == 1);
}

/* How copy_out writes a field of a binary COPY in CSV, as the server's CSV COPY of the query
   jobs.postgres_pages formats (_pg_text) would print it: */
enum field {
    B_TEXT,        /* text (formatted): quoted where CSV needs it, an empty one as "" */
    B_STORED_TEXT, /* text as stored: a formula prefix neutralised, an empty one as empty */
    B_INT2,
    B_INT4,
    B_INT8,
    B_NUMERIC,     /* as numeric_out prints it */
    B_DATE,        /* ISO, years 1 to 9999 */
    B_TIMESTAMP,   /* timestamp, or timestamptz in a UTC session: to the second, years 1 to 9999 */
};

static inline uint32_t be16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }

static inline uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t be64(const unsigned char *p) {
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static void put2(Buf *b, int v) {
    PUT(b, (char)('0' + v / 10));
    PUT(b, (char)('0' + v % 10));
}

/* YYYY-MM-DD of a day counted from PostgreSQL's epoch (2000-01-01), or -1 outside years 1
   to 9999 (BC, a fifth digit, infinity: printed otherwise). The civil calendar from days of
   H. Hinnant's chrono-compatible algorithms. */
static int put_day(Buf *b, int64_t day) {
    int64_t z = day + 10957 + 719468; /* from 0000-03-01 */
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    int64_t d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9;
    int64_t y = yoe + era * 400 + (m <= 2);
    if (y < 1 || y > 9999) return -1;
    put2(b, (int)(y / 100));
    put2(b, (int)(y % 100));
    PUT(b, '-');
    put2(b, (int)m);
    PUT(b, '-');
    put2(b, (int)d);
    return 0;
}

/* A numeric's binary form (ndigits, weight, sign, dscale, then base-10000 digits) as
   numeric_out prints it (PostgreSQL's get_str_from_var); -1 for a shape it does not have. */
static int put_numeric(Buf *b, const unsigned char *p, size_t n) {
    if (n < 8) return -1;
    int ndigits = (int)be16(p), weight = (int16_t)be16(p + 2), sign = (int)be16(p + 4);
    int dscale = (int)be16(p + 6);
    if (n != 8 + 2 * (size_t)ndigits) return -1;
    const char *special = sign == 0xC000 ? "NaN" : sign == 0xD000 ? "Infinity"
                        : sign == 0xF000 ? "-Infinity" : NULL;
    if (grow(b, 16 + 4 * (size_t)(weight > 0 ? weight : 0) + (size_t)dscale)) return -2;
    if (special) {
        memcpy(b->data + b->len, special, strlen(special));
        b->len += strlen(special);
        return 0;
    }
    if (sign != 0 && sign != 0x4000) return -1;
    for (int i = 0; i < ndigits; i++)
        if (be16(p + 8 + 2 * i) > 9999) return -1;
#define DIGIT(d) ((d) >= 0 && (d) < ndigits ? (int)be16(p + 8 + 2 * (d)) : 0)
    if (sign == 0x4000) PUT(b, '-');
    int d;
    if (weight < 0) {
        d = weight + 1;
        PUT(b, '0');
    } else {
        for (d = 0; d <= weight; d++) {
            int dig = DIGIT(d);
            if (d == 0) { /* no leading zeroes */
                put_digits(b, (uint64_t)dig);
                continue;
            }
            put2(b, dig / 100);
            put2(b, dig % 100);
        }
    }
    if (dscale > 0) {
        PUT(b, '.');
        size_t end = b->len + (size_t)dscale;
        for (int i = 0; i < dscale; d++, i += 4) { /* whole groups, then cut to dscale */
            int dig = DIGIT(d);
            put2(b, dig / 100);
            put2(b, dig % 100);
        }
        b->len = end;
    }
#undef DIGIT
    return 0;
}

/* Text as the server's CSV COPY prints it (quoted where it holds " , CR or LF, an empty one as
   ""), with `stored`, after _pg_text's rules (a formula prefix neutralised, empty as NULL).
   -1 for `\.` alone in a one-column row (the server quotes it) and for what put_text refuses. */
static int put_copy_text(Buf *b, const unsigned char *s, size_t n, int stored, size_t columns) {
    if (columns == 1 && n == 2 && s[0] == '\\' && s[1] == '.') return -1;
    if (!n && !stored) {
        if (grow(b, 2)) return -2;
        PUT(b, '"');
        PUT(b, '"');
        return 0;
    }
    return put_text(b, s, n, stored); /* formatted text is neutralised already */
}

/* One tuple of a binary COPY (from p, n bytes left) as a CSV row: its length in p, 0 for the
   trailer, -1 for a field it does not write (the caller has the server format the page). */
static long put_tuple(Buf *b, const unsigned char *p, size_t n, const unsigned char *fields,
                      size_t columns) {
    if (n < 2) return -1;
    if (be16(p) == 0xFFFF) return 0; /* the trailer */
    if (be16(p) != columns) return -1;
    size_t at = 2;
    for (size_t c = 0; c < columns; c++) {
        if (n - at < 4) return -1;
        int32_t length = (int32_t)be32(p + at);
        at += 4;
        if (grow(b, 32)) return -2;
        if (c) PUT(b, ',');
        if (length < 0) continue; /* NULL: an empty field */
        if ((size_t)length > n - at) return -1;
        const unsigned char *v = p + at;
        size_t len = (size_t)length;
        at += len;
        int done = 0;
        switch (fields[c]) {
        case B_TEXT:
        case B_STORED_TEXT:
            done = put_copy_text(b, v, len, fields[c] == B_STORED_TEXT, columns);
            break;
        case B_INT2:
            if (len != 2) return -1;
            put_int(b, (int16_t)be16(v));
            break;
        case B_INT4:
            if (len != 4) return -1;
            put_int(b, (int32_t)be32(v));
            break;
        case B_INT8:
            if (len != 8) return -1;
            put_int(b, (int64_t)be64(v));
            break;
        case B_NUMERIC:
            done = put_numeric(b, v, len);
            break;
        case B_DATE:
            if (len != 4) return -1;
            done = put_day(b, (int32_t)be32(v));
            break;
        case B_TIMESTAMP: {
            if (len != 8) return -1;
            int64_t us = (int64_t)be64(v), s = us / 1000000 - (us % 1000000 < 0);
            int64_t day = s / 86400 - (s % 86400 < 0), second = s - day * 86400;
            if ((done = put_day(b, day))) break;
            PUT(b, ' ');
            put2(b, (int)(second / 3600));
            PUT(b, ':');
            put2(b, (int)(second / 60 % 60));
            PUT(b, ':');
            put2(b, (int)(second % 60));
            break;
        }
        default:
            return -1;
        }
        if (done) return done;
    }
    if (grow(b, 1)) return -2;
    PUT(b, '\n');
    return (long)at;
}

static const unsigned char SIGNATURE[11] = "PGCOPY\n\377\r\n";

/* copy_out(pgconn_ptr, fields=None) -> (bytes, rows, last row): the rows of the COPY TO STDOUT
   under way on that connection, until its end or an error (the caller reads the command's
   result next); with `fields` (one enum field a column), a binary COPY written as CSV, or
   False once a field is not one it writes (the rest of the COPY is read and dropped). */
static PyObject *copy_out(PyObject *Py_UNUSED(module), PyObject *args) {
    unsigned long long address;
    const char *fields = NULL;
    Py_ssize_t columns = 0;
    if (!PyArg_ParseTuple(args, "K|z#", &address, &fields, &columns)) return NULL;
    if (libpq_copies != 1) {
        PyErr_SetString(PyExc_RuntimeError, "no single libpq is loaded");
        return NULL;
    }
    Buf b = {0};
    size_t last_at = 0, last_length = 0;
    int rows = 0, n, failed = 0, refused = 0, header = fields != NULL;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        char *message;
        n = pq_get_copy_data((void *)(uintptr_t)address, &message, 0); /* 0: wait, no GIL */
        if (n <= 0) break;
        const unsigned char *p = (const unsigned char *)message;
        size_t left = (size_t)n;
        if (failed || refused) {
            /* read to the end, dropped */
        } else if (!fields) { /* CSV: a message a row */
            failed = grow(&b, left);
            if (!failed) {
                last_at = b.len;
                memcpy(b.data + b.len, p, left);
                b.len += left;
                last_length = left;
                rows++;
            }
        } else {
            if (header) { /* before the first tuple: signature, flags, extension */
                if (left < 19 || memcmp(p, SIGNATURE, 11) || be32(p + 15) > left - 19) {
                    refused = 1;
                } else {
                    size_t skip = 19 + be32(p + 15);
                    p += skip, left -= skip;
                    header = 0;
                }
            }
            while (left && !refused && !failed) { /* a tuple a message, as the server sends */
                size_t at = b.len;
                long used = put_tuple(&b, p, left, (const unsigned char *)fields,
                                      (size_t)columns);
                if (used == -2) failed = 1;
                else if (used < 0) refused = 1;
                else if (used == 0) left = 0; /* the trailer */
                else {
                    p += used, left -= (size_t)used;
                    last_at = at, last_length = b.len - at;
                    rows++;
                }
            }
        }
        pq_freemem(message); /* after a failure too: the COPY is read to its end */
    }
    Py_END_ALLOW_THREADS
    PyObject *result;
    if (failed) result = PyErr_NoMemory();
    else if (refused) result = Py_NewRef(NotFast);
    else result = Py_BuildValue("(y#iy#)", b.data ? b.data : "", (Py_ssize_t)b.len, rows,
                                b.data ? b.data + last_at : "", (Py_ssize_t)last_length);
    free(b.data);
    return result;
}

static PyMethodDef module_functions[] = {
    {"libpq", libpq, METH_NOARGS, "Whether copy_out can run: one libpq is loaded."},
    {"copy_out", copy_out, METH_VARARGS,
     "copy_out(pgconn_ptr, fields=None) -> (bytes, rows, last row) of the COPY TO STDOUT under "
     "way: its CSV, or with `fields` a binary COPY written as CSV (False: a field it does not "
     "write)."},
    {NULL},
};

static PyMethodDef Reader_methods[] = {
    {"page", (PyCFunction)Reader_page, METH_VARARGS,
     "page(after, until) -> (CSV bytes, rows, last key), None for a page without rows, or "
     "False for a page holding a value only the Arrow reader writes"},
    {"close", (PyCFunction)Reader_close, METH_NOARGS, "Close the database."},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "jobs._fastcsv.Reader",
    .tp_doc = "Reader(uri, (first, first_until, after, after_until), kinds, scales, limit): "
              "CSV pages of an SQLite query, the key first, then one column per kind.",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "jobs._fastcsv",
    .m_doc = "An SQLite query's canonical values as CSV pages, and a PostgreSQL COPY's rows, "
             "in C.", .m_size = -1, .m_methods = module_functions,
};

PyMODINIT_FUNC PyInit__fastcsv(void) {
    init_classes();
    NotFast = Py_False;
    if (PyType_Ready(&ReaderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
