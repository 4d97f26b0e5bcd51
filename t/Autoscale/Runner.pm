package Autoscale::Runner;

# A small runner for the Test::Nginx::Socket(::Lua) .t format, for machines
# without Test::Nginx. It follows Test::Nginx's semantics (config layout,
# section meanings, test names); the differences are listed in the POD of
# t/Autoscale.pm. Load it through t/Autoscale.pm, never directly.

use strict;
use warnings;

use Cwd ();
use File::Path qw(make_path remove_tree);
use File::Spec;
use HTTP::Response;
use IO::Select;
use IO::Socket::INET;
use List::Util qw(shuffle);
use POSIX ();
use Scalar::Util qw(looks_like_number);
use Test::Base ();    # blocks() and the section filters; imported by Autoscale.pm
use Test::More ();
use Text::Diff ();
use Time::HiRes qw(sleep time);

our @EXPORT = qw(
    run_tests repeat_each workers master_on master_off master_process_enabled
    log_level no_shuffle no_long_string no_root_location add_block_preprocessor
    env_to_nginx server_port server_root html_dir bail_out timeout
    worker_connections add_cleanup_handler
);

our $NginxBinary   = $ENV{TEST_NGINX_BINARY} || 'nginx';
our $LoadModules   = $ENV{TEST_NGINX_LOAD_MODULES} // '';
our $ServerPort    = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
our $Timeout       = $ENV{TEST_NGINX_TIMEOUT} || 3;
our $LogLevel      = $ENV{TEST_NGINX_LOG_LEVEL} || 'debug';
our $MasterProcess = $ENV{TEST_NGINX_MASTER_PROCESS} || 'off';
our $NoShuffle     = $ENV{TEST_NGINX_NO_SHUFFLE} || 0;
our $Workers           = 1;
our $WorkerConnections = 64;
our $RepeatEach        = 1;
our $NoRootLocation    = 0;
our $NoLongString      = 0;
our (@BlockPreprocessors, @CleanupHandlers, @EnvToNginx);

our $ServRoot = $ENV{TEST_NGINX_SERVROOT} || File::Spec->rel2abs('t/servroot');
$ServRoot =~ s{/+$}{};
$ENV{TEST_NGINX_SERVER_ROOT} = $ServRoot;
our $HtmlDir    = "$ServRoot/html";
our $LogDir     = "$ServRoot/logs";
our $ConfFile   = "$ServRoot/conf/nginx.conf";
our $PidFile    = "$LogDir/nginx.pid";
our $ErrLogFile = "$LogDir/error.log";
# nginx's own stderr: on Debian's build, messages logged before the configured
# error_log is open (e.g. config errors) go there instead of logs/error.log.
# Kept under logs/, so that Test::Nginx, which refuses a servroot with files
# it does not know, can use the same servroot after this runner.
our $StderrFile = "$LogDir/nginx.stderr";

my ($NginxPid, $StarterPid, $NginxVersion, $NginxV, $ErrLogPos, $StderrRead);

# The config of the last block that had one (Test::Nginx's $PrevConfig).
my $PrevConfig;

# Sections that Test::Nginx acts on and this runner does not: a block with one
# is refused rather than run with part of its expectations ignored.
our @Unsupported = qw(
    raw_request raw_request_middle_delay pipelined_requests request_eval http09 http2 http3
    stap stap_out stap_out_like stap_out_unlike
    tcp_listen tcp_query tcp_query_len tcp_reply tcp_reply_delay tcp_shutdown tcp_shutdown_delay tcp_no_close
    udp_listen udp_query udp_reply udp_reply_delay
    shutdown_error_log response_body_filters response_body_eval response_body_json_sort charset
    raw_response_headers_like raw_response_headers_unlike access_log write_resp_body_file
    init post_main_config post_setup_server_root server_name error_log_file reload_fails shutdown
    curl curl_error curl_options curl_protocol skip_nginx2 skip_openssl skip_slave todo_nginx
);

# ---- settings (same names and meanings as Test::Nginx::Util) ----------------

sub repeat_each (@)       { $RepeatEach = shift if @_; $RepeatEach }
sub workers (@)           { $Workers = shift if @_; $Workers }
sub worker_connections (@) { $WorkerConnections = shift if @_; $WorkerConnections }
sub log_level (@)         { $LogLevel = shift if @_; $LogLevel }
sub timeout (@)           { $Timeout = shift if @_; $Timeout }
sub server_port (@)       { $ServerPort = shift if @_; $ServerPort }
sub master_on ()          { $MasterProcess = 'on' }
sub master_off ()         { $MasterProcess = 'off' }
sub master_process_enabled (@) {
    $MasterProcess = shift() ? 'on' : 'off' if @_;
    $MasterProcess;
}
sub no_shuffle ()            { $NoShuffle = 1 }
sub no_long_string ()        { $NoLongString = 1 }
sub no_root_location ()      { $NoRootLocation = 1 }
sub server_root ()           { $ServRoot }
sub html_dir ()              { $HtmlDir }
sub add_block_preprocessor (&) { unshift @BlockPreprocessors, shift }
sub add_cleanup_handler ($)  { unshift @CleanupHandlers, shift }

sub env_to_nginx (@) {
    for my $v (@_) {
        die "env_to_nginx: bad argument value: $v\n" if $v !~ /^[A-Za-z_]/ || $v =~ /\n/;
        push @EnvToNginx, $v;
    }
}

sub bail_out (@) {
    cleanup();
    Test::More::BAIL_OUT(join '', @_);
}

# ---- process management -----------------------------------------------------

sub cleanup {
    my $fast = shift;
    $_->() for @CleanupHandlers;
    stop_nginx($fast);
}

END { cleanup() }

sub proc_stat {
    open my $fh, '<', "/proc/$_[0]/stat" or return;
    my $stat = <$fh> // return;
    return $stat =~ /^\d+ \(.*\) (\S) \d+ (\d+)/;    # state, process group
}

# A zombie that nobody has reaped yet counts as gone.
sub gone {
    my $pid = shift;
    return 1 unless kill 0, $pid;
    my ($state) = proc_stat($pid);
    return !defined $state || $state eq 'Z';
}

# Live (non-zombie) members of a process group.
sub group_members {
    my $pgid = shift;
    opendir my $dh, '/proc' or return;
    return grep {
        my ($state, $group) = proc_stat($_);
        defined $state && $state ne 'Z' && $group == $pgid;
    } grep { /^\d+$/ } readdir $dh;
}

sub wait_gone {
    my ($pid, $secs) = @_;
    my $deadline = time + $secs;
    while (!gone($pid)) {
        return 0 if time > $deadline;
        sleep 0.01;
    }
    return 1;
}

# Stops the nginx we started: QUIT (graceful; skipped when $fast), then TERM,
# then KILL. The daemonized master leads its own process group, so the
# workers are killed with it if they outlive it.
sub stop_nginx {
    my $fast = shift;
    if (defined $StarterPid) {
        kill 'KILL', $StarterPid;
        waitpid $StarterPid, 0;
        undef $StarterPid;
    }
    my $pid = $NginxPid // return;
    undef $NginxPid;
    for my $step ($fast ? () : ['QUIT', $Timeout], ['TERM', 2], ['KILL', 2]) {
        my ($sig, $secs) = @$step;
        kill $sig, $pid;
        last if wait_gone($pid, $secs);
        warn "WARNING: nginx $pid survived SIG$sig for ${secs}s\n";
    }
    my $deadline = time + 1;
    sleep 0.01 while group_members($pid) && time < $deadline;
    kill 'KILL', -$pid if group_members($pid);
}

sub read_pidfile {
    open my $fh, '<', $PidFile or return undef;
    my $pid = <$fh> // '';
    return $pid =~ /^(\d+)/ ? $1 : undef;
}

# An nginx left behind by an earlier, killed run of this servroot.
sub stop_stale_nginx {
    my $pid = read_pidfile() // return;
    open my $fh, '<', "/proc/$pid/cmdline" or return;
    my $cmd = <$fh> // '';
    return unless $cmd =~ /nginx/ && index($cmd, "$ServRoot/") >= 0;
    warn "WARNING: stopping stale nginx $pid from $PidFile\n";
    $NginxPid = $pid;
    stop_nginx();
}

sub port_listening {
    my $hex = sprintf '%04X', shift;
    my $seen_table;
    for my $table ('/proc/net/tcp', '/proc/net/tcp6') {
        open my $fh, '<', $table or next;
        $seen_table = 1;
        while (<$fh>) {
            return 1 if /^\s*\d+:\s+[0-9A-F]+:$hex\s+[0-9A-F]+:[0-9A-F]+\s+0A\s/;
        }
    }
    return !$seen_table;    # cannot tell: let the request's connect retries decide
}

# Runs nginx in the foreground until it daemonizes (or fails). Returns the
# wait status; stderr goes to $StderrFile.
sub start_nginx {
    my $pid = fork // bail_out("fork failed: $!");
    if ($pid == 0) {
        open STDOUT, '>', '/dev/null';
        open STDERR, '>', $StderrFile;
        exec($NginxBinary, '-p', "$ServRoot/", '-c', $ConfFile)
            or print STDERR "cannot exec $NginxBinary: $!\n";
        POSIX::_exit(127);
    }
    $StarterPid = $pid;
    my $deadline = time + 10;
    while (waitpid($pid, POSIX::WNOHANG()) == 0) {
        if (time > $deadline) {
            kill 'KILL', $pid;
            waitpid $pid, 0;
            undef $StarterPid;
            return -1;
        }
        sleep 0.005;
    }
    undef $StarterPid;
    return $?;
}

# After a successful start: find the daemon's pid and wait until it listens.
sub wait_ready {
    my $deadline = time + 10;
    until (defined($NginxPid = read_pidfile())) {
        return "no pid in $PidFile" if time > $deadline;
        sleep 0.005;
    }
    until (port_listening($ServerPort)) {
        return "nginx $NginxPid exited" if gone($NginxPid);
        return "nobody listens on port $ServerPort" if time > $deadline;
        sleep 0.005;
    }
    return undef;
}

sub nginx_version {
    my $out = `$NginxBinary -V 2>&1`;
    bail_out("cannot run \"$NginxBinary -V\": $out") if $? != 0;
    $NginxV = $out;
    return $out =~ m{/(\d+)\.(\d+)\.(\d+)} ? canon_version($1, $2, $3) : undef;
}

sub canon_version { sprintf '%d.%03d%03d', @_ }

# ---- servroot and nginx.conf ------------------------------------------------

sub setup_server_root {
    if (-d $ServRoot) {
        # remove only what we create, in case TEST_NGINX_SERVROOT is misused
        remove_tree("$ServRoot/conf", $HtmlDir, $LogDir, glob("$ServRoot/*_temp"));
        unlink "$ServRoot/nginx.stderr";    # where older versions of this runner wrote it
    }
    make_path($LogDir, $HtmlDir, "$ServRoot/conf");
    write_file("$HtmlDir/index.html",
        '<html><head><title>It works!</title></head><body>It works!</body></html>');
}

sub write_file {
    my ($path, $data) = @_;
    open my $fh, '>', $path or bail_out("cannot write $path: $!");
    binmode $fh;
    print $fh $data;
    close $fh or bail_out("cannot write $path: $!");
}

# Replaces $TEST_NGINX_XXX with a per-block random free port (RAND_PORT_N)
# or the environment variable's value, as Test::Nginx does.
sub expand_env {
    my ($text, $name, $ports) = @_;
    return $text if !defined $text || ref $text;
    $text =~ s{\$(TEST_NGINX_[_A-Z0-9]+)}{
        my $var = $1;
        if ($var =~ /^TEST_NGINX_RAND_PORT_\d+$/) {
            $ports->{$var} //= rand_port($ports, $name);
        } else {
            defined $ENV{$var} or bail_out("$name - No environment $var defined.");
            $ENV{$var};
        }
    }ge;
    return $text;
}

sub expand_each {
    my ($val, $x) = @_;
    return ref $val eq 'ARRAY' ? [map { $x->($_) } @$val] : $x->($val);
}

sub rand_port {
    my ($ports, $name) = @_;
    my %used = map { $_ => 1 } grep { defined } $ServerPort, values %$ports;
    for (1 .. 1000) {
        # below the kernel's ephemeral range, clear of ports reserved elsewhere
        my $port = 20000 + int rand 12000;
        next if $used{$port};
        my $sock = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1', LocalPort => $port, Proto => 'tcp') or next;
        close $sock;
        return $port;
    }
    bail_out("$name - cannot find a free port");
}

sub write_user_files {
    my ($block, $x) = @_;
    my $files = $block->user_files // return;
    if (!ref $files) {
        my @list;
        for my $line (split /^/, $files) {
            if ($line =~ /^>>> (\S+)(?:\s+(.+))?/) {
                push @list, [$1, '', $2];
            } elsif (@list) {
                $list[-1][1] .= $line;
            }
        }
        $files = \@list;
    }
    for my $file (@$files) {
        my ($fname, $body, $date) = @$file;
        my $path = $fname =~ m{^/} ? $fname : "$HtmlDir/$fname";
        make_path($1) if $path =~ m{(.*)/} && !-d $1;
        write_file($path, $x->($body // ''));
        if ($date) {
            system('touch', '-t', $date, $path) == 0 or bail_out("cannot touch $path");
        }
    }
}

sub write_config {
    my ($block, $x) = @_;
    my $config      = $x->($block->config // '');
    my $http_config = $x->($block->http_config // '');
    my $main_config = $x->($block->main_config // '');
    my $log_level   = $block->log_level || $LogLevel;

    my $modules = join '', map { "load_module $_;\n" } split ' ', $LoadModules;
    my $env     = join '', map { "env $_;\n" } map { /\s/ ? "'$_'" : $_ } @EnvToNginx;
    my $user    = $ENV{TEST_NGINX_WORKER_USER} ? "user $ENV{TEST_NGINX_WORKER_USER};"
                : $> == 0 ? 'user root;' : '';
    # as Test::Nginx (0.31 and later): proxy_temp_path and client_body_temp_path
    # unless the block's http_config has them, the others unless nginx is
    # built without their module (a block that sets one of these gets
    # "directive is duplicate" from nginx, as with Test::Nginx)
    my $temps = '';
    for my $t (qw(client_body proxy fastcgi scgi uwsgi)) {
        next if ($t eq 'client_body' || $t eq 'proxy') && $http_config =~ /\b${t}_temp_path\b/;
        next if $t =~ /^(?:fastcgi|scgi|uwsgi)$/ && ($NginxV // '') =~ /--without-http_${t}_module/;
        $temps .= "    ${t}_temp_path $ServRoot/${t}_temp;\n";
    }
    my $root_location = $NoRootLocation ? '' : <<"_EOC_";
        location / {
            root $HtmlDir;
            index index.html index.htm;
        }
_EOC_

    write_file($ConfFile, <<"_EOC_");
${modules}worker_processes  $Workers;
daemon on;
master_process $MasterProcess;
error_log $ErrLogFile $log_level;
pid       $PidFile;
$user
$env
$main_config

http {
    access_log $LogDir/access.log;
    default_type text/plain;
    keepalive_timeout  68;
$temps
$http_config

    server {
        listen          $ServerPort;
        server_name     'localhost';
        client_max_body_size 30M;

        # Begin test case config...
$config
        # End test case config.

$root_location    }
}

events {
    accept_mutex off;
    worker_connections  $WorkerConnections;
}
_EOC_
}

# ---- requests and responses -------------------------------------------------

# "METHOD [URL [VERSION]]" on the first line, an optional body after it.
sub build_request {
    my ($req, $more) = @_;
    1 while $req =~ s/^\s*\#[^\n]+\s+|^\s+//s;
    my ($first, $body) = split /\n/, $req, 2;
    my ($meth, $url, $ver) = split ' ', $first // '';
    $url //= '/';
    $ver //= 'HTTP/1.1';

    my ($headers, $chunked) = ('', 0);
    for my $line (split /\n+/, $more // '') {
        next if $line =~ /^\s*#/;
        my ($key, $val) = split /:\s*/, $line, 2;
        $val //= '';
        $chunked = 1 if lc $key eq 'transfer-encoding' && $val eq 'chunked';
        $headers .= "$key: $val\r\n";
    }
    $body //= '';
    if (!$chunked && $body ne '') {
        $body =~ s/^\s+|\s+$//g;
        $headers .= 'Content-Length: ' . length($body) . "\r\n"
            unless $headers =~ /^Content-Length:/mi;
    }
    my $std = '';
    $std .= "Host: localhost\r\n"   unless $headers =~ /^Host:/mi;
    $std .= "Connection: close\r\n" unless $headers =~ /^Connection/mi;
    return "$meth $url $ver\r\n$std$headers\r\n$body";
}

# Sends one request on a new connection and reads until the server closes it
# or stays silent for $timeout seconds. A timeout is a failed test, as with
# Test::Nginx, unless $abort (the block's --- abort).
sub send_request {
    my ($raw, $timeout, $name, $abort) = @_;
    my $sock;
    for my $try (1 .. 50) {
        $sock = IO::Socket::INET->new(
            PeerAddr => '127.0.0.1', PeerPort => $ServerPort,
            Proto => 'tcp', Timeout => $timeout) and last;
        sleep 0.02;
    }
    if (!$sock) {
        Test::More::diag("$name - cannot connect to 127.0.0.1:$ServerPort: $!");
        return '';
    }
    binmode $sock;
    my $off = 0;
    while ($off < length $raw) {
        my $n = syswrite($sock, $raw, length($raw) - $off, $off);
        last unless $n;
        $off += $n;
    }
    my ($resp, $sel) = ('', IO::Select->new($sock));
    while (1) {
        if (!$sel->can_read($timeout)) {
            if (!$abort) {
                # as Test::Nginx: one test more than the plan, so no "planned N" complaint
                Test::More->builder->no_ending(1);
                Test::More::fail("ERROR: client socket timed out - $name\n");
            }
            last;
        }
        my $n = sysread($sock, my $buf, 65536);
        last unless $n;
        $resp .= $buf;
    }
    close $sock;
    return $resp;
}

sub parse_response {
    my ($raw, $is_head, $name) = @_;
    return undef if $raw eq '';
    my $res = HTTP::Response->parse($raw);
    my $code = $res->code;
    $res->code(undef) if defined $code && $code !~ /^\d+$/;
    return $res if $is_head || !$code || $code == 304 || $code == 101;
    my $body = $res->content // '';
    if (lc($res->header('Transfer-Encoding') // '') eq 'chunked') {
        my $decoded = '';
        while ($body =~ /\G[ \t]*([0-9A-Fa-f]+)[^\r\n]*\r\n/gc) {
            my ($len, $pos) = (hex $1, pos $body);
            last if $len == 0;
            if (substr($body, $pos + $len, 2) ne "\r\n") {
                Test::More::diag("$name - invalid chunked body");
                last;
            }
            $decoded .= substr $body, $pos, $len;
            pos($body) = $pos + $len + 2;
        }
        $res->content($decoded);
    } elsif (defined(my $len = $res->header('Content-Length'))) {
        $res->content(substr $body, 0, $len) if $len =~ /^\d+$/ && length($body) > $len;
    }
    return $res;
}

# ---- checks -----------------------------------------------------------------

sub indexed {
    my ($name, $val, $idx, $need_array) = @_;
    if (ref $val eq 'ARRAY') {
        bail_out("$name - SHOULD NOT HAPPEN: idx != 0 and don't need array.")
            if !$need_array && $idx;
        return $val->[$idx];
    }
    bail_out("$name - You asked for many requests, the expected results should be arrays as well.")
        if $need_array;
    return $val;
}

sub is_text {
    my ($got, $expected, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    return Test::More::like($got, $expected, $name) if ref $expected eq 'Regexp';
    if ($NoLongString || !defined $got || !defined $expected
        || "$got$expected" !~ /\n./s)
    {
        return Test::More::is($got, $expected, $name);
    }
    my $ok = Test::More::ok($got eq $expected, $name);
    Test::More::diag(Text::Diff::diff(\$expected, \$got,
        { STYLE => 'Unified', FILENAME_A => 'expected', FILENAME_B => 'got' })) unless $ok;
    return $ok;
}

sub check_response {
    my ($block, $res, $idx, $rep, $need_array, $x) = @_;
    my $name = $block->name;
    my $code = ($res && $res->code) || '';

    if (defined $block->error_code_like) {
        my $pat = indexed($name, scalar $block->error_code_like, $idx, $need_array);
        Test::More::like($code, qr/$pat/sm, "$name - status code ok");
    } else {
        my $want = defined $block->error_code
            ? indexed($name, scalar $block->error_code, $idx, $need_array) : 200;
        Test::More::is($code, $want, "$name - status code ok");
    }

    if (defined $block->response_headers) {
        my $want = parse_headers(expand_each(
            indexed($name, scalar $block->response_headers, $idx, $need_array), $x));
        for my $key (sort keys %$want) {
            my $got = $res ? $res->header($key) : undef;
            if (!defined $want->{$key}) {
                Test::More::ok(!defined $got, "$name - header $key not present in the raw headers");
            } else {
                Test::More::is($got // '', $want->{$key}, "$name - header $key ok");
            }
        }
    } elsif (defined $block->response_headers_like) {
        my $want = parse_headers(indexed($name, scalar $block->response_headers_like, $idx, $need_array));
        for my $key (sort keys %$want) {
            my $got = ($res && $res->header($key)) // '';
            Test::More::like($got, qr/^$want->{$key}$/, "$name - header $key like ok");
        }
    }

    my $content = $res ? $res->content : undef;
    if (defined $block->response_body) {
        my $want = expand_each(indexed($name, scalar $block->response_body, $idx, $need_array), $x);
        $want =~ s/\$ServerPort\b/$ServerPort/g if defined $want && !ref $want;
        my $label = ref $want ? 'like' : 'response is expected';
        is_text($content, $want, "$name - response_body - $label (repeated req $rep, req $idx)");
    } elsif (defined $block->response_body_like || defined $block->response_body_unlike) {
        my $type = defined $block->response_body_like ? 'like' : 'unlike';
        my $section = "response_body_$type";
        my $pat = indexed($name, scalar $block->$section, $idx, $need_array);
        (my $summary = $content // '') =~ s/\s+/ /g;
        $summary =~ s/^ | $//g;
        my $cmp = $type eq 'like' ? \&Test::More::like : \&Test::More::unlike;
        $cmp->($content, qr/$pat/s, "$name - response_body_$type - response is expected ($summary)");
    }
}

sub parse_headers {
    my %headers;
    for my $line (split /\n/, shift // '') {
        $line =~ s/^\s+|\s+$//g;
        next if $line eq '';
        if ($line =~ s/^!\s*//) {
            $headers{$line} = undef;
        } else {
            my ($key, $val) = split /\s*:\s*/, $line, 2;
            $headers{$key} = $val // '';
        }
    }
    return \%headers;
}

# New error.log lines since the last call, preceded (once per run) by what
# nginx printed on stderr before its error_log was open.
sub error_log_lines {
    my @lines;
    if (!$StderrRead++ && open my $err, '<', $StderrFile) {
        push @lines, <$err>;
    }
    if (open my $log, '<', $ErrLogFile) {
        seek $log, $ErrLogPos, 0;
        push @lines, <$log>;
        $ErrLogPos = tell $log;
    }
    return \@lines;
}

sub patterns {
    my ($pats, $x) = @_;
    return [split /\n+/, $x->($pats)] unless ref $pats;
    return [$pats] if ref $pats eq 'Regexp';
    return [map { $x->($_) } @$pats];
}

sub line_matches { my ($line, $pat) = @_; ref $pat ? $line =~ /$pat/ : index($line, $pat) >= 0 }

sub fmt { my $s = shift; chomp $s; $s =~ s/"/\\"/g; $s =~ s/\r/\\r/g; $s =~ s/\n/\\n/g; $s }

sub check_error_log {
    my ($block, $rep, $x) = @_;
    my $name = $block->name;
    my $lines = error_log_lines();

    if (defined(my $grep = $block->grep_error_log)) {
        $grep = $grep->[$rep] if ref $grep eq 'ARRAY';
        my $want = $block->grep_error_log_out;
        bail_out("$name - No --- grep_error_log_out defined but --- grep_error_log is defined")
            unless defined $want;
        $want = $want->[$rep] if ref $want eq 'ARRAY';
        my $got = '';
        for my $line (@$lines) {
            next unless ref $grep ? $line =~ /$grep/ : $line =~ /\Q$grep\E/;
            $got .= "$&\n" if $& !~ /\n/;
        }
        is_text($got, $want, "$name - grep_error_log_out (req $rep)");
    }

    if (defined $block->error_log) {
        for my $pat (@{ patterns(scalar $block->error_log, $x) }) {
            if (grep { line_matches($_, $pat) } @$lines) {
                Test::More::pass("$name - pattern \"$pat\" matches a line in error.log (req $rep)");
            } else {
                Test::More::fail("$name - pattern \"$pat\" should match a line in error.log (req $rep)");
            }
        }
    }

    if (defined $block->no_error_log) {
        for my $pat (@{ patterns(scalar $block->no_error_log, $x) }) {
            my ($hit) = grep { line_matches($_, $pat) } @$lines;
            my $p = fmt($pat);
            if (defined $hit) {
                Test::More::fail("$name - pattern \"$p\" should not match any line in error.log"
                    . " but matches line \"" . fmt($hit) . "\" (req $rep)");
            } else {
                Test::More::pass("$name - pattern \"$p\" does not match a line in error.log (req $rep)");
            }
        }
    }

    # like Test::Nginx: surface serious messages nobody asked about
    my @asked = grep { defined } scalar $block->error_log, scalar $block->no_error_log;
    my $asked = join "\n", map { ref $_ eq 'ARRAY' ? @$_ : $_ } @asked;
    for my $level (qw(alert crit emerg)) {
        next if index($asked, "[$level") >= 0;
        warn "WARNING: $name - ", fmt($_), "\n" for grep { /\[$level\]/ } @$lines;
    }
}

# ---- driving the blocks -----------------------------------------------------

sub failures { scalar grep { !$_ } Test::More->builder->summary }

sub tail_diag {
    my $name = shift;
    my @lines;
    for my $file ($StderrFile, $ErrLogFile) {
        open my $fh, '<', $file or next;
        push @lines, grep { m{^\d{4}/\d\d/\d\d [\d:]+ \[(?!debug)} } <$fh>;
    }
    splice @lines, 0, @lines - 20 if @lines > 20;
    Test::More::diag("$name - last non-debug lines of nginx's logs ($LogDir):\n", @lines) if @lines;
}

sub parse_time {
    my $t = shift // return undef;
    return $1 / 1000 if $t =~ /^\s*([\d.]+)\s*ms\s*$/;
    return $1 if $t =~ /^\s*([\d.]+)\s*s?\s*$/;
    return $t;
}

# "N: >= 1.2.3 [: reason]" and "N: perl code", as Test::Nginx.
sub skip_reason {
    my $block = shift;
    my $name = $block->name;
    if (defined(my $spec = $block->skip_nginx)) {
        $spec =~ /^\s*(\d+)\s*:\s*([<>]=?)\s*(\d+)\.(\d+)\.(\d+)(?:\s*:\s*(.*))?\s*$/
            or bail_out("$name - Invalid --- skip_nginx spec: $spec");
        my ($n, $op, $reason) = ($1, $2, $6 || "nginx version $2 $3.$4.$5");
        my $want = canon_version($3, $4, $5);
        return ($n, $reason) if defined $NginxVersion && eval "$NginxVersion $op $want";
    }
    if (defined(my $spec = $block->skip_eval)) {
        $spec =~ /^\s*(\d+)\s*:\s*(.*)/s or bail_out("$name - Invalid --- skip_eval spec: $spec");
        my ($n, $code) = ($1, $2);
        my $skip = eval $code;
        bail_out("$name - skip_eval - failed to eval the Perl code \"$code\": $@") if $@;
        return ($n, 'skip_eval') if $skip;
    }
    return;
}

sub run_tests () {
    $ENV{TEST_NGINX_SERVER_PORT} //= $ServerPort;
    $NginxVersion = nginx_version();
    # no plan declared: count the tests as they run (through Test::Base's
    # plan wrapper, so that its END block does not run tests of its own)
    Test::More::plan('no_plan') unless Test::More->builder->has_plan;
    local @SIG{qw(INT TERM HUP)} = (sub { cleanup('fast'); exit 130 }) x 3;

    my @blocks = Test::Base::blocks();
    @blocks = shuffle @blocks unless $NoShuffle;
    for my $block (@blocks) {
        $_->($block) for @BlockPreprocessors;
        $block->set_value(name => "$0 " . $block->name);
        run_block($block);
    }
    cleanup();
}

# What Test::Nginx refuses, refused here before anything runs, each with a
# bail out as there. Test::Nginx finds some of these only after starting
# nginx, or only when the block happens to run first; the checks here do not
# depend on the order or on the machine (skipped blocks are checked too).
sub check_block {
    my $block = shift;
    my $name = $block->name;
    for my $sec (@Unsupported) {
        bail_out("$name - --- $sec is not supported by the bundled runner (t/Autoscale/Runner.pm);"
            . " run this file with Test::Nginx") if defined $block->{$sec};
    }
    if (!defined $block->config) {
        bail_out("$name - No '--- config' section specified and could not get previous one.")
            unless defined $PrevConfig;
        # Test::Nginx then starts no nginx for the block: it sends the request
        # to the nginx of whichever block ran before (in random order).
        bail_out("$name - No '--- config' section: Test::Nginx would not start nginx for this block"
            . " (so its http_config, main_config and must_die would go unused) but send its request"
            . " to the previous block's nginx; give the block a --- config");
    }
    $PrevConfig = $block->config;
    return if defined $block->must_die;    # Test::Nginx sends no request then
    my $reqs = $block->request;
    bail_out("$name - No '--- request' section (Test::Nginx: \"Request line should be non-empty\");"
        . " only a must_die block goes without one") unless defined $reqs;
    for my $req (ref $reqs eq 'ARRAY' ? @$reqs : $reqs) {
        (my $first = $req // '') =~ s/^(?:\s*\#[^\n]+\s+|\s+)+//s;
        ($first) = split /\n/, $first, 2;
        bail_out("$name - Request line should be non-empty") if ($first // '') eq '';
        bail_out("$name - Request line is not valid. Should be 'meth [url [version]]' but got \"$first\".")
            unless $first =~ /^\s*\S+(?: +\S+)?(?: +\S+)?\s*$/;
    }
}

sub run_block {
    my $block = shift;
    my $name = $block->name;
    return if defined $block->SKIP;
    check_block($block);
    my ($skip_n, $skip_why) = skip_reason($block);
    my ($todo_n, $todo_why) = ($block->todo // '') =~ /^\s*(\d+)\s*:\s*(.*)/s;
    my $tb = Test::More->builder;

    for my $rep (0 .. $RepeatEach - 1) {
        if ($skip_n) {
            $tb->skip("$name - $skip_why") for 1 .. $skip_n;
            next;
        }
        $tb->todo_start("$name - $todo_why") if defined $todo_n;
        my $failed = failures();
        eval { run_once($block, $rep); 1 } or do {
            my $err = $@;
            stop_nginx();
            die $err;
        };
        tail_diag($name) if failures() > $failed;
        $tb->todo_end if defined $todo_n;
    }
}

# One run of a block: fresh servroot, start nginx, requests, stop, log checks.
sub run_once {
    my ($block, $rep) = @_;
    my $name = $block->name;
    my %ports;
    my $x = sub { expand_env($_[0], $name, \%ports) };

    stop_stale_nginx();
    setup_server_root();
    ($ErrLogPos, $StderrRead) = (0, 0);
    write_user_files($block, $x);
    write_config($block, $x);

    my $status = start_nginx();
    for (my $waited = 0; $status > 0 && $waited < 3 && !defined $block->must_die; $waited += 0.1) {
        # the port may still be held by something that is going away
        last unless slurp($StderrFile) =~ /Address already in use/;
        sleep 0.1;
        $status = start_nginx();
    }

    if (defined(my $must_die = $block->must_die)) {
        if ($status == -1) {
            Test::More::fail("$name - failed to execute the nginx command line");
        } elsif ($status & 127) {
            Test::More::fail("$name - nginx got signal " . ($status & 127));
        } elsif (looks_like_number($must_die)) {
            Test::More::is($status >> 8, $must_die, "$name - die with the expected exit code");
        } else {
            Test::More::isnt($status, 0, "$name - die as expected");
        }
        if ($status == 0) {
            warn "WARNING: $name - nginx must die but it does not; killing it\n";
            wait_ready();
            stop_nginx();
        }
        check_error_log($block, $rep, $x);
        return;
    }

    if ($status != 0) {
        Test::More::fail("$name - cannot start nginx: \"$NginxBinary -p $ServRoot/ -c $ConfFile\""
            . " (status $status)" . start_error());
        return;
    }
    if (my $err = wait_ready()) {
        Test::More::fail("$name - nginx did not come up: $err");
        stop_nginx();
        return;
    }

    my $reqs = $block->request;
    bail_out("$name - No '--- request' section") unless defined $reqs;
    $reqs = [$reqs] unless ref $reqs eq 'ARRAY';
    my $need_array = @$reqs > 1;
    my $more = $block->more_headers;
    my $timeout = parse_time($block->timeout) // $Timeout;
    my $wait = parse_time($block->wait);

    for my $idx (0 .. $#$reqs) {
        my $hdrs = ref $more eq 'ARRAY' ? $more->[$idx] : $more;
        my $raw = build_request($x->($reqs->[$idx]), $x->($hdrs));
        my $resp = send_request($raw, $timeout, $name, defined $block->abort);
        unless (defined $block->ignore_response) {
            my $res = parse_response($resp, scalar($raw =~ /^HEAD\s/), $name);
            check_response($block, $res, $idx, $rep, $need_array, $x);
        }
        if ($idx < $#$reqs) {
            sleep $wait if $wait;
            check_error_log($block, $rep, $x);
        }
    }
    sleep $wait if $wait;
    stop_nginx();    # flushes everything nginx logs up to its exit
    check_error_log($block, $rep, $x);
}

# Why nginx did not start: its [emerg]/[alert]/[crit] lines, and for "directive
# is duplicate" the lines of nginx.conf that have the directive.
sub start_error {
    my @why = grep { /\[(?:emerg|alert|crit)\]/ } split /^/, slurp($StderrFile) . slurp($ErrLogFile);
    return '' unless @why;
    chomp @why;
    my $msg = join '', map { "\n    $_" } @why;
    for my $dup (map { /"(\w+)" directive is duplicate/ ? $1 : () } @why) {
        my @conf = split /\n/, slurp($ConfFile);
        $msg .= "\n    $dup in $ConfFile:"
            . join '', map { "\n      " . ($_ + 1) . ": $conf[$_]" } grep { $conf[$_] =~ /\b\Q$dup\E\b/ } 0 .. $#conf;
        $msg .= "\n    (the runner writes ${dup} itself, as Test::Nginx does: leave it out of the block)"
            if $dup =~ /^(?:fastcgi|scgi|uwsgi)_temp_path$/;
    }
    return $msg;
}

sub slurp {
    open my $fh, '<', shift or return '';
    local $/;
    return <$fh> // '';
}

1;
