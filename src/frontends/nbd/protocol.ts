/** NBD protocol constants (NetworkBlockDevice doc/proto.md). All integers on the wire are big-endian. */
export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags
export const FLAG_FIXED_NEWSTYLE = 0x1;
export const FLAG_NO_ZEROES = 0x2;
export const CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// Options
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;

// Option reply types
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
export const REP_ERR_UNSUP = 0x80000001;
export const REP_ERR_POLICY = 0x80000002;
export const REP_ERR_INVALID = 0x80000003;
export const REP_ERR_PLATFORM = 0x80000004;
export const REP_ERR_TLS_REQD = 0x80000005;
export const REP_ERR_UNKNOWN = 0x80000006;
export const REP_ERR_SHUTDOWN = 0x80000007;
export const REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const REP_ERR_TOO_BIG = 0x80000009;

// Info types
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// Transmission flags
export const TFLAG_HAS_FLAGS = 0x1;
export const TFLAG_READ_ONLY = 0x2;
export const TFLAG_SEND_FLUSH = 0x4;
export const TFLAG_SEND_FUA = 0x8;
export const TFLAG_ROTATIONAL = 0x10;
export const TFLAG_SEND_TRIM = 0x20;
export const TFLAG_SEND_WRITE_ZEROES = 0x40;
export const TFLAG_SEND_DF = 0x80;
export const TFLAG_CAN_MULTI_CONN = 0x100;
export const TFLAG_SEND_CACHE = 0x400;
export const TFLAG_SEND_FAST_ZERO = 0x800;

// Commands
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

// Command flags
export const CMD_FLAG_FUA = 0x1;
export const CMD_FLAG_NO_HOLE = 0x2;
export const CMD_FLAG_DF = 0x4;
export const CMD_FLAG_REQ_ONE = 0x8;
export const CMD_FLAG_FAST_ZERO = 0x10;

// Structured reply chunk types and flags
export const REPLY_FLAG_DONE = 0x1;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = 0x8001;
export const REPLY_TYPE_ERROR_OFFSET = 0x8002;

// base:allocation flags
export const STATE_HOLE = 0x1;
export const STATE_ZERO = 0x2;
export const META_CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const META_CONTEXT_ID_BASE_ALLOCATION = 1;

// Errors
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOVERFLOW = 75;
export const ENOTSUP = 95;
export const ESHUTDOWN = 108;

/** Sizes we advertise in NBD_INFO_BLOCK_SIZE and enforce. */
export const BLOCK_SIZE_MIN_BYTES = 512;
export const BLOCK_SIZE_PREFERRED_BYTES = 4096;
export const REQUEST_BYTES_MAX = 32 * 1024 * 1024;
/** Option data longer than this is refused (the longest legitimate option is a name plus a few queries). */
export const OPTION_BYTES_MAX = 64 * 1024;
/** Requests in flight per connection before the server stops reading from the socket. */
export const REQUESTS_IN_FLIGHT_MAX = 128;
