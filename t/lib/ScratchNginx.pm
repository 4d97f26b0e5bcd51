package ScratchNginx;

# A private nginx started from a scratch directory outside the checkout, for the tests that run a shipped
# configuration (the README's complete nginx.conf, examples/nginx.conf) from an installed prefix: a clean
# environment (no LUA_PATH/LUA_CPATH), the scratch directory as working directory, stopped by its PID.

use strict;
use warnings;

use Exporter 'import';
use File::Temp ();
use HTTP::Tiny;
use POSIX ();
use Time::HiRes ();

our @EXPORT_OK = qw(scratch_dir temp_paths start_nginx stop_nginx http_get backends_conf repo_root
                    readme_conf lua_paths_report);

# Debian's nginx, or TEST_NGINX_BINARY when it names another nginx binary (not the project's wrapper under t/).
our $NGINX   = $ENV{TEST_NGINX_BINARY} && $ENV{TEST_NGINX_BINARY} !~ m{/t/Autoscale/} && -x $ENV{TEST_NGINX_BINARY}
             ? $ENV{TEST_NGINX_BINARY} : '/usr/sbin/nginx';
our @MODULES = map { "/usr/lib/nginx/modules/$_.so" } qw(ndk_http_module ngx_http_lua_module);

sub repo_root {
    require Cwd;
    require File::Basename;
    return Cwd::abs_path(File::Basename::dirname(__FILE__) . '/../..');
}

# A fresh directory under the system temp dir (not the checkout), readable by the workers (user nobody).
sub scratch_dir {
    my ($tag) = @_;
    my $dir = File::Temp::tempdir("autoscale-$tag-XXXXXX", TMPDIR => 1, CLEANUP => !$ENV{KEEP_SCRATCH});
    chmod 0755, $dir;
    return $dir;
}

# The five *_temp_path directives under $dir (Debian's compiled-in defaults under /var/lib/nginx may not exist).
sub temp_paths {
    my ($dir) = @_;
    return join '', map { "    ${_}_temp_path $dir/tmp/$_;\n" } qw(client_body proxy fastcgi uwsgi scgi);
}

# Writes $conf to $dir/conf/nginx.conf and starts nginx (daemon) with env -i (plus the variables of the optional
# hash $env), cwd $dir. Returns (pid, error) after the pid file appeared and the master is alive (bounded wait).
sub start_nginx {
    my ($dir, $conf, $env) = @_;
    mkdir "$dir/$_" for qw(conf logs tmp);
    chmod 0755, "$dir/$_" for qw(conf logs tmp);
    open my $fh, '>', "$dir/conf/nginx.conf" or die "$dir/conf/nginx.conf: $!";
    print $fh $conf;
    close $fh;
    unlink "$dir/logs/nginx.pid";
    my $out = "$dir/logs/start.out";
    my $child = fork // die "fork: $!";
    if ($child == 0) {
        chdir $dir or POSIX::_exit(126);
        open STDOUT, '>', $out;
        open STDERR, '>&', \*STDOUT;
        %ENV = (PATH => '/usr/sbin:/usr/bin:/bin', %{ $env || {} });
        { no warnings 'exec'; exec $NGINX, '-p', "$dir/", '-e', "$dir/logs/error.log", '-c', "$dir/conf/nginx.conf"; }
        POSIX::_exit(127);
    }
    waitpid $child, 0;
    my $rc = $? >> 8;
    my $start = slurp($out);
    return (undef, "nginx exited $rc at start:\n$start" . error_log_tail($dir)) if $rc;
    for (1 .. 100) {
        my $pid = slurp("$dir/logs/nginx.pid");
        if ($pid =~ /^(\d+)/ && kill 0, $1) {
            Time::HiRes::sleep(0.2);    # the workers' init_worker
            return (0 + $1, undef);
        }
        Time::HiRes::sleep(0.05);
    }
    return (undef, "no nginx.pid after 5 s:\n$start" . error_log_tail($dir));
}

# SIGQUIT, then SIGTERM after 5 s, SIGKILL after 10 s; returns once the master is gone.
sub stop_nginx {
    my ($pid) = @_;
    return unless $pid;
    kill 'QUIT', $pid;
    for my $i (1 .. 200) {
        return 1 unless kill 0, $pid;
        kill 'TERM', $pid if $i == 100;
        Time::HiRes::sleep(0.05);
    }
    kill 'KILL', $pid;
    return 0;
}

sub http_get {
    my ($url, %headers) = @_;
    my $res = HTTP::Tiny->new(timeout => 5)->get($url, { headers => \%headers });
    return $res;
}

# A plain nginx (no Lua) answering 200 on each port: the backends the gateway under test balances over.
sub backends_conf {
    my ($dir, @ports) = @_;
    my $servers = join '', map {
        "    server { listen 127.0.0.1:$_; location / { return 200 \"backend $_\\n\"; } }\n"
    } @ports;
    return "pid $dir/logs/nginx.pid;\nerror_log $dir/logs/error.log warn;\nworker_processes 1;\n"
        . "events { worker_connections 256; }\nhttp {\n    access_log off;\n" . temp_paths($dir) . $servers . "}\n";
}

# The README's complete nginx.conf: the first ```nginx block after the "## A complete nginx.conf" heading.
sub readme_conf {
    my $readme = slurp(repo_root() . '/README.md');
    $readme =~ /^\#\# [ ]A[ ]complete[ ]nginx\.conf[ \t]*\n .*? ^```nginx\n (.*?) ^```[ \t]*$/msx
        or die "README.md: no ```nginx block after '## A complete nginx.conf'\n";
    return $1;
}

# An extra server block (added to a configuration under test, next to its own servers) that reports where the Lua
# code and the library were found: package.path, package.cpath, the file each module resolves to.
sub lua_paths_report {
    my ($port) = @_;
    return <<"EOF";
    server {
        listen 127.0.0.1:$port;
        location = /paths {
            content_by_lua_block {
                ngx.say("path ", package.path)
                ngx.say("cpath ", package.cpath)
                for _, m in ipairs({ "resty.autoscale", "resty.autoscale.discovery.addr", "resty.autoscale.lib" }) do
                    ngx.say("module ", m, " ", tostring(package.searchpath(m, package.path)))
                end
            }
        }
    }
EOF
}

sub error_log_tail {
    my ($dir) = @_;
    my $log = slurp("$dir/logs/error.log");
    my @lines = split /\n/, $log;
    @lines = @lines[-20 .. -1] if @lines > 20;
    return @lines ? "error.log:\n" . join("\n", @lines) . "\n" : '';
}

sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or return '';
    local $/;
    return scalar <$fh>;
}

1;
